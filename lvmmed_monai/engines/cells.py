"""VISTA-2D-style cell segmentation with LVM-Med weights: its loss, a foreground Dice, and a short training demo.

MONAI's VISTA-2D bundle trains ``CellSamWrapper``'s 3 output channels as a cell-probability logit (channel 0,
binary cross-entropy against the foreground) and cellpose flows (channels 1-2, mean squared error against 5
times the unit flows, weighted 0.5): :func:`vista2d_loss`. :func:`run_vista2d_demo` does that with
:func:`~lvmmed_monai.networks.cell_sam.lvmmed_cell_sam` on generated cells
(:func:`~lvmmed_monai.demo.cells.cell_images`) and reports the held-out foreground Dice before and after.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lvmmed_monai.demo.cells import cell_flow_targets, cell_images
from lvmmed_monai.demo.synthetic import official_vit_b_state
from lvmmed_monai.io import atomic_open
from lvmmed_monai.networks.cell_sam import lvmmed_cell_sam
from lvmmed_monai.optim import encoder_decoder_param_groups

__all__ = ["vista2d_loss", "foreground_dice", "run_vista2d_demo", "FLOW_SCALE", "VISTA2D_REPORT"]

FLOW_SCALE = 5.0  # VISTA-2D (as cellpose) regresses 5 x the unit flows
VISTA2D_REPORT = "vista2d_report.json"


def vista2d_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """VISTA-2D's loss (adopted from cellpose) for ``logits`` and ``target`` ``(N, 3, H, W)``.

    ``target`` channel 0 is the foreground, channels 1-2 the unit flows
    (:func:`~lvmmed_monai.demo.cells.cell_flow_targets`): ``BCE(logits[:, 0], fg) + 0.5 * MSE(logits[:, 1:],
    5 * flows)``.
    """
    if logits.shape != target.shape or logits.ndim != 4 or logits.shape[1] != 3:
        raise ValueError(f"expected logits and target (N, 3, H, W) alike, got {tuple(logits.shape)} and "
                         f"{tuple(target.shape)}")
    flows = F.mse_loss(logits[:, 1:], FLOW_SCALE * target[:, 1:])
    return F.binary_cross_entropy_with_logits(logits[:, :1], target[:, :1]) + 0.5 * flows


@torch.no_grad()
def foreground_dice(net: nn.Module, images: torch.Tensor, foreground: torch.Tensor, batch_size: int = 2) -> float:
    """Mean per-image Dice of ``sigmoid(net(images)[:, 0]) > 0.5`` against ``foreground`` ``(N, 1, H, W)``
    (MONAI's ``compute_dice``; the network is put in eval mode)."""
    from monai.metrics import compute_dice

    net.eval()
    pred = torch.cat([net(images[i : i + batch_size])[:, :1] > 0 for i in range(0, len(images), batch_size)])
    return float(compute_dice(pred.float(), foreground.float(), include_background=True).nanmean())


def run_vista2d_demo(
    out_dir: str | os.PathLike = "outputs/vista2d",
    steps: int = 20,
    size: int = 256,
    seed: int = 0,
    weights: str | os.PathLike | Mapping[str, Any] | None = None,
    batch_size: int = 2,
    lr: float = 1e-3,
    encoder_lr_scale: float = 0.1,
    num_train: int = 16,
    num_val: int = 4,
    log_every: int = 5,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Fine-tune ``lvmmed_cell_sam`` with VISTA-2D's outputs and loss on generated cells; return the report.

    The network is built at ``network_resize_roi = size`` (VISTA-2D trains 256 px crops resized to SAM's 1024;
    a CPU cannot afford 1024) and loads ``weights``, by default a generated checkpoint with random weights in
    the official ``lvmmed_vit.pth`` layout (1024 px tables, resized on load: the path real weights take).
    Training: ``steps`` steps on ``num_train`` images (seed ``seed``), :func:`vista2d_loss`, AdamW at ``lr`` for
    the decoder and ``lr * encoder_lr_scale`` for the LVM-Med encoder (the bundle's SGD with warm-up and cosine
    decay is made for 200 epochs, not a few steps); the foreground Dice is measured on
    ``num_val`` other images (seed ``seed + 1``) before and after. Images go in as VISTA-2D feeds them, scaled
    to [0, 1]. ``out_dir/vista2d_report.json`` is written atomically.
    """
    if steps < 0 or size < 16 or size % 16 or batch_size < 1 or num_train < 1 or num_val < 1:
        raise ValueError(f"need steps >= 0, size a multiple of 16, batch_size, num_train and num_val >= 1; got "
                         f"steps={steps}, size={size}, batch_size={batch_size}, num_train={num_train}, "
                         f"num_val={num_val}")
    start = time.perf_counter()
    torch.manual_seed(seed)
    if weights is None:
        source = "generated (random weights, official SAM ViT-B layout)"
    else:
        source = "a state dict" if isinstance(weights, Mapping) else str(weights)
    net = lvmmed_cell_sam(official_vit_b_state(seed) if weights is None else weights, network_resize_roi=size)
    log(f"[vista2d] CellSamWrapper at {size} px, encoder weights: {source}; load report:\n"
        + net.load_report.summary())

    def tensors(n: int, image_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = cell_images(n, size=size, seed=image_seed)
        return torch.from_numpy(images), torch.from_numpy(cell_flow_targets(labels))

    train_x, train_y = tensors(num_train, seed)
    val_x, val_y = tensors(num_val, seed + 1)
    before = foreground_dice(net, val_x, val_y[:, :1], batch_size)
    log(f"[vista2d] held-out foreground Dice before training: {before:.3f}")
    opt = torch.optim.AdamW(encoder_decoder_param_groups(net.model, lr, encoder_lr_scale, "image_encoder"),
                            weight_decay=1e-5)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    train_start = time.perf_counter()
    for step in range(steps):
        net.train()
        idx = torch.randperm(num_train, generator=gen)[:batch_size]
        loss = vista2d_loss(net(train_x[idx]), train_y[idx])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if step == 0 or (step + 1) % max(log_every, 1) == 0 or step == steps - 1:
            log(f"[vista2d] step {step + 1}/{steps} loss {losses[-1]:.4f} "
                f"({time.perf_counter() - train_start:.1f} s)")
    after = foreground_dice(net, val_x, val_y[:, :1], batch_size)
    seconds = time.perf_counter() - start
    log(f"[vista2d] held-out foreground Dice before {before:.3f} -> after {after:.3f} ({steps} steps, {size} px, "
        f"{seconds:.1f} s in all)")
    report = {
        "dice_before": before, "dice_after": after, "steps": steps, "size": size, "seed": seed,
        "batch_size": batch_size, "lr": lr, "encoder_lr_scale": encoder_lr_scale, "num_train": num_train,
        "num_val": num_val, "weights": source, "losses": losses, "seconds": round(seconds, 1),
        "load_notes": list(net.load_report.notes), "torch_threads": torch.get_num_threads(),
        "mean_val_foreground": float(np.mean(val_y[:, 0].numpy())),
    }
    with atomic_open(Path(out_dir) / VISTA2D_REPORT, "w") as fh:
        json.dump(report, fh, indent=2)
    return report
