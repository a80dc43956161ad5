"""Padding of 2D inputs to the encoders' stride, in a form TorchScript compiles (bundle ``ckpt_export``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["pad_to_multiple"]


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the last two axes of ``x`` (``(..., H, W)``) at the bottom and right to multiples of ``multiple``
    (``(..., ceil(H / m) * m, ceil(W / m) * m)``); a no-op when they already are. The amounts are
    ``(m - H % m) % m``, with non-negative operands only, and ``multiple`` is an argument: ``torch.jit.script``
    compiles this function (it cannot read a class attribute such as ``LVMMedResNet50.feature_stride``)."""
    h, w = x.shape[-2], x.shape[-1]
    return F.pad(x, [0, (multiple - w % multiple) % multiple, 0, (multiple - h % multiple) % multiple])
