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

from lvmmed_monai.data.phantoms import SHAPE_CLASSES, shape_phantoms

__all__ = ["embed", "knn_accuracy", "linear_probe_accuracy", "load_labeled_folder", "compare_encoders"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def embed(encoder: nn.Module, images: torch.Tensor, mean: tuple, std: tuple, batch_size: int = 64,
          device: str | torch.device = "cpu") -> torch.Tensor:
    """``(N, 1 or 3, H, W)`` images in ``[0, 1]`` -> ``(N, D)`` pooled frozen features (eval mode)."""
    encoder = encoder.eval().to(device)
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=device).view(1, -1, 1, 1)
    out = []
    for chunk in images.split(batch_size):
        x = chunk.to(device).float()
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        out.append(encoder.feature_map((x - m) / s).mean((2, 3)).float().cpu())
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
    from lvmmed_monai.data.pretrain import IMAGE_EXTENSIONS, PretrainDataError, load_normalized

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

    ``data``: a labeled folder (``root/<class>/*.png``; split 50/50 by a seeded shuffle) or None for the
    generated shape set (:func:`~lvmmed_monai.data.phantoms.shape_phantoms`, ``num_train`` + ``num_test``).
    The random encoder has the same architecture, seeded with ``seed``.
    """
    from lvmmed_monai.engines.pretrain import build_encoder, input_normalization

    if data:
        x, y, classes = load_labeled_folder(data, image_size)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        half = len(y) // 2
        xtr, ytr, xte, yte = x[perm[:half]], y[perm[:half]], x[perm[half:]], y[perm[half:]]
    else:
        classes = list(SHAPE_CLASSES)
        xs, ys = shape_phantoms(num_train + num_test, size=image_size, seed=seed + 1000)
        x, y = torch.from_numpy(xs), torch.from_numpy(ys)
        xtr, ytr, xte, yte = x[:num_train], y[:num_train], x[num_train:], y[num_train:]
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
