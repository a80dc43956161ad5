"""Frozen-encoder probes: kNN and linear-probe accuracy of a pretrained vs a randomly initialised encoder.

The encoder is frozen in eval mode; images are embedded once (global average pool of ``feature_map``) and
two classifiers are fit on the training embeddings: a cosine kNN vote and a multinomial logistic regression
(the linear probe, L-BFGS on standardised features). Both report accuracy on held-out images.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lvmmed_monai.demo.phantoms import SHAPE_CLASSES, shape_phantoms

__all__ = ["encoder_input", "embed", "knn_accuracy", "linear_probe_accuracy", "load_labeled_folder",
           "labeled_split", "compare_encoders", "effective_rank", "mean_dice", "segmentation_probe_dice",
           "finetune_segmentation_dice"]

logger = logging.getLogger(__name__)


def encoder_input(x: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    """Images in ``[0, 1]`` (1 or 3 channels) -> the encoder's normalised 3-channel input (grey replicated)."""
    x = x.float()
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


@torch.no_grad()
def embed(encoder: nn.Module, images: torch.Tensor, mean: tuple, std: tuple, batch_size: int = 64,
          device: str | torch.device = "cpu") -> torch.Tensor:
    """``(N, 1 or 3, H, W)`` images in ``[0, 1]`` -> ``(N, D)`` pooled frozen features (eval mode)."""
    encoder = encoder.eval().to(device)
    out = []
    for chunk in images.split(batch_size):
        out.append(encoder.feature_map(encoder_input(chunk.to(device), mean, std)).mean((2, 3)).float().cpu())
    return torch.cat(out)


def knn_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 k: int = 10) -> float:
    """Majority vote of the ``k`` nearest training embeddings by cosine similarity (ties: lowest label)."""
    sim = F.normalize(test_x, dim=1) @ F.normalize(train_x, dim=1).T
    nearest = train_y[sim.topk(min(k, len(train_y)), dim=1).indices]
    votes = F.one_hot(nearest, int(train_y.max()) + 1).sum(1)
    return float((votes.argmax(1) == test_y).float().mean())


def linear_probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                          test_y: torch.Tensor, weight_decay: float = 1e-3, steps: int = 200) -> float:
    """Multinomial logistic regression on standardised embeddings (L-BFGS, L2 ``weight_decay``)."""
    mu, sd = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    xtr, xte = (train_x - mu) / sd, (test_x - mu) / sd
    head = nn.Linear(xtr.shape[1], int(train_y.max()) + 1).double()
    opt = torch.optim.LBFGS(head.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(head(xtr.double()), train_y) + weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float((head(xte.double()).argmax(1) == test_y).float().mean())


def load_labeled_folder(root: str | os.PathLike, size: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """2D images under ``root/<class name>/`` -> ``(N, 1, size, size)`` in ``[0, 1]`` (per-image percentile
    normalisation, as pretraining), labels ``(N,)`` and the sorted class names."""
    from lvmmed_monai.data.loading import IMAGE_EXTENSIONS, PretrainDataError, load_normalized

    classes = sorted(p.name for p in Path(root).iterdir() if p.is_dir()) if Path(root).is_dir() else []
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((Path(root) / name).iterdir()):
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                arr = torch.from_numpy(load_normalized(path, "image")[:1])
                images.append(F.interpolate(arr[None], size=(size, size), mode="area")[0])
                labels.append(label)
    if len(classes) < 2 or not images:
        raise PretrainDataError(f"{root}: need one sub-folder of 2D images per class (at least 2 classes)")
    return torch.stack(images), torch.tensor(labels), classes


def labeled_split(
    data: str | os.PathLike | None, image_size: int, num_train: int = 400, num_test: int = 400, seed: int = 0
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], list[str]]:
    """``((train_x, train_y, test_x, test_y), class names)`` for the frozen-encoder probes: a labelled folder
    (:func:`load_labeled_folder`) split 50/50 by a permutation seeded with ``seed``, or, when it holds ``train/``
    and ``test/`` labelled folders with the same classes, that split as given (for instance patches from
    disjoint slices, :func:`lvmmed_monai.data.atlas.prepare_mr_data`); for ``data`` None the generated shape
    phantoms (``num_train`` + ``num_test``, generated with ``seed + 1000``). Deterministic; draws from no global
    random stream."""
    if data and (Path(data) / "train").is_dir() and (Path(data) / "test").is_dir():
        xtr, ytr, classes = load_labeled_folder(Path(data) / "train", image_size)
        xte, yte, test_classes = load_labeled_folder(Path(data) / "test", image_size)
        if test_classes != classes:
            raise ValueError(f"{data}: train/ and test/ must hold the same class folders, got {classes} and "
                             f"{test_classes}")
        return (xtr, ytr, xte, yte), classes
    if data:
        x, y, classes = load_labeled_folder(data, image_size)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        half = len(y) // 2
        return (x[perm[:half]], y[perm[:half]], x[perm[half:]], y[perm[half:]]), classes
    xs, ys = shape_phantoms(num_train + num_test, size=image_size, seed=seed + 1000)
    x, y = torch.from_numpy(xs), torch.from_numpy(ys)
    return (x[:num_train], y[:num_train], x[num_train:], y[num_train:]), list(SHAPE_CLASSES)


def compare_encoders(
    weights: str | os.PathLike,
    encoder_name: str = "lvmmed_resnet50",
    image_size: int = 64,
    data: str | os.PathLike | None = None,
    num_train: int = 400,
    num_test: int = 400,
    knn_k: int = 10,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict[str, dict[str, float]]:
    """Print and return kNN and linear-probe accuracy for the encoder in ``weights`` and a random one.

    ``data``: a labeled folder (``root/<class>/*.png``, split 50/50 by a seeded shuffle, or ``root/train/<class>``
    and ``root/test/<class>``, split as given) or None for the generated shape set
    (:func:`~lvmmed_monai.demo.phantoms.shape_phantoms`, ``num_train`` + ``num_test``).
    The random encoder has the same architecture, seeded with ``seed``.
    """
    from lvmmed_monai.encoders import build_encoder, input_normalization

    (xtr, ytr, xte, yte), classes = labeled_split(data, image_size, num_train, num_test, seed)
    mean, std = input_normalization(encoder_name)
    results: dict[str, dict[str, float]] = {}
    torch.manual_seed(seed)
    for label, path in (("pretrained", weights), ("random init", None)):
        encoder = build_encoder(encoder_name, image_size, weights=None if path is None else str(path))
        ftr, fte = embed(encoder, xtr, mean, std, device=device), embed(encoder, xte, mean, std, device=device)
        results[label] = {"knn": knn_accuracy(ftr, ytr, fte, yte, k=knn_k),
                          "linear": linear_probe_accuracy(ftr, ytr, fte, yte)}
    chance = float(np.bincount(yte.numpy()).max() / len(yte))
    lines = [f"frozen-encoder probes, {len(classes)} classes {classes}, {len(ytr)} train / {len(yte)} test "
             f"images at {image_size} px (majority class {chance:.3f})",
             f"{'encoder':<14}{'kNN (k=' + str(knn_k) + ')':>12}{'linear probe':>14}"]
    lines += [f"{name:<14}{r['knn']:>12.3f}{r['linear']:>14.3f}" for name, r in results.items()]
    print("\n".join(lines), flush=True)
    return results


def effective_rank(features: torch.Tensor) -> float:
    """RankMe effective rank (Garrido et al. 2023): ``exp`` of the entropy of the normalised singular values of
    the centred ``(N, D)`` features; between 1 (all variance on one axis: collapse) and ``min(N, D)``."""
    x = features.double() - features.double().mean(0)
    s = torch.linalg.svdvals(x)
    p = s / s.sum().clamp_min(1e-12)
    return float(torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()))


def _levels(encoder: nn.Module, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """All stage outputs but the stem (strides 4..32) resized to ``size`` and concatenated (hypercolumns)."""
    feats = encoder(x)[1:]
    return torch.cat([F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in feats], 1)


def mean_dice(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Mean Dice over the foreground classes present in ``target`` or ``pred`` ((N, H, W) label maps),
    pooled over all images (MONAI's ``compute_dice`` on one-hot maps with the batch flattened into one)."""
    from monai.metrics import compute_dice

    def one_hot(t: torch.Tensor) -> torch.Tensor:
        return F.one_hot(t.flatten(), num_classes).T.reshape(1, num_classes, -1, 1).float()

    dice = compute_dice(one_hot(pred), one_hot(target), include_background=False, ignore_empty=True)
    return float(dice.nanmean())


def segmentation_probe_dice(
    encoder: nn.Module, mean: tuple, std: tuple, train_x: torch.Tensor, train_y: torch.Tensor,
    test_x: torch.Tensor, test_y: torch.Tensor, num_classes: int, steps: int = 500, stride: int = 8,
    lr: float = 0.05, weight_decay: float = 1e-4, seed: int = 0, optimizer: str = "lbfgs",
) -> float:
    """Linear segmentation probe on a frozen encoder: a 1x1 convolution on its hypercolumn features (all stages,
    resized to ``1 / stride`` of the input and standardised), logits upsampled bilinearly, pixel-wise
    cross-entropy plus the L2 penalty ``weight_decay / 2 * |W|^2``; returns the test mean Dice (:func:`mean_dice`).

    ``optimizer="lbfgs"`` (default) minimises that convex objective with full-batch L-BFGS (strong Wolfe line
    search, ``steps`` iterations, zero start, float64), as :func:`linear_probe_accuracy` does: the answer is
    the objective's minimiser, not a point on an optimiser's path. ``"adam"`` is the probe before that (Adam,
    ``lr``, ``steps`` full-batch steps from a seeded ``0.01`` start; earlier tables in docs/ssl.md used it with
    300 steps): at ``lr`` 0.05 its training loss jumps by 10-40x late in the run, so its Dice depended on the
    step it stopped at and even on the thread count (docs/ssl.md).

    Why hypercolumns: a 64 px input gives ResNet-50 a 2 x 2 last stage, too coarse alone for a label map.
    """
    if optimizer not in ("lbfgs", "adam"):
        raise ValueError(f"optimizer must be 'lbfgs' or 'adam', got {optimizer!r}")
    h, w = train_x.shape[-2:]
    grid = (h // stride, w // stride)
    encoder = encoder.eval()
    with torch.no_grad():
        def hyper(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([_levels(encoder, encoder_input(c, mean, std), grid) for c in x.split(32)])

        ftr, fte = hyper(train_x), hyper(test_x)
        mu, sd = ftr.mean((0, 2, 3), keepdim=True), ftr.std((0, 2, 3), keepdim=True).clamp_min(1e-6)
        ftr, fte = (ftr - mu) / sd, (fte - mu) / sd
    head = nn.Conv2d(ftr.shape[1], num_classes, 1)

    def logits(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(head(x), size=(h, w), mode="bilinear", align_corners=False)

    if optimizer == "lbfgs":
        head, ftr, fte = head.double(), ftr.double(), fte.double()
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        opt = torch.optim.LBFGS(head.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(logits(ftr), train_y) + 0.5 * weight_decay * head.weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
    else:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.01)
            head.bias.zero_()
        opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
        for _ in range(steps):
            loss = F.cross_entropy(logits(ftr), train_y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        pred = logits(fte).argmax(1)
    return mean_dice(pred, test_y, num_classes)


def finetune_segmentation_dice(
    encoder_state: dict[str, torch.Tensor], mean: tuple, std: tuple, train_x: torch.Tensor,
    train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, num_classes: int, steps: int = 100,
    batch_size: int = 8, lr: float = 1e-3, seed: int = 0,
) -> float:
    """Fine-tune MONAI's FlexibleUNet (:class:`~lvmmed_monai.networks.LVMMedFlexibleUNet`) whose ResNet-50
    encoder starts from ``encoder_state`` for ``steps`` Adam steps (Dice + cross-entropy, the decoder and the
    batch order seeded alike for every encoder); returns the test mean Dice (:func:`mean_dice`)."""
    from monai.losses import DiceCELoss

    from lvmmed_monai.networks import LVMMedFlexibleUNet

    torch.manual_seed(seed)
    net = LVMMedFlexibleUNet(in_channels=3, out_channels=num_classes, weights=encoder_state)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(steps):
        idx = torch.randint(len(train_x), (batch_size,), generator=gen)
        loss = loss_fn(net(encoder_input(train_x[idx], mean, std)), train_y[idx, None])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        pred = torch.cat([net(encoder_input(c, mean, std)).argmax(1) for c in test_x.split(16)])
    return mean_dice(pred, test_y, num_classes)
