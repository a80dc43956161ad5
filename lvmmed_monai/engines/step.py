"""One home for the optimizer step of every trainer: float16 autocast, gradient scaling, clipping of the global
gradient norm, step (:func:`amp_step`, for the trainers that own their iteration) and the clipping alone for
MONAI's ``SupervisedTrainer``, which owns its step (:class:`GradientClipHandler`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from ignite.engine import Engine
from monai.engines.utils import IterationEvents
from torch.optim import Optimizer

__all__ = ["amp_step", "clip_gradients", "GradientClipHandler"]


def clip_gradients(optimizer: Optimizer, max_norm: float | None, norm_type: float = 2.0) -> torch.Tensor:
    """Clip the global gradient norm of ``optimizer``'s parameters at ``max_norm`` (None or 0: no clipping) and
    return the norm before clipping."""
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    return torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf"), norm_type)


def amp_step(optimizer: Optimizer, grad_scaler: torch.amp.GradScaler, forward: Callable[[], tuple[torch.Tensor, Any]],
             device_type: str, use_amp: bool, clip_grad_norm: float | None) -> tuple[torch.Tensor, Any, torch.Tensor]:
    """``forward()`` -> ``(loss, extra)`` under float16 autocast (``use_amp``), then backward through the scaler,
    unscale, clip (:func:`clip_gradients`), step. Returns ``(loss, extra, gradient norm before clipping)``."""
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type, dtype=torch.float16, enabled=use_amp):
        loss, extra = forward()
    grad_scaler.scale(loss).backward()
    grad_scaler.unscale_(optimizer)
    grad_norm = clip_gradients(optimizer, clip_grad_norm)
    grad_scaler.step(optimizer)
    grad_scaler.update()
    return loss, extra, grad_norm


class GradientClipHandler:
    """Clip the global gradient norm of a ``SupervisedTrainer``'s optimizer after each backward pass (on
    ``IterationEvents.BACKWARD_COMPLETED``, before the step; gradients are unscaled first under AMP). MONAI
    has no such handler."""

    def __init__(self, max_norm: float, norm_type: float = 2.0) -> None:
        self.max_norm, self.norm_type = float(max_norm), float(norm_type)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if getattr(engine, "amp", False) and getattr(engine, "scaler", None) is not None:
            engine.scaler.unscale_(engine.optimizer)
        if self.max_norm > 0:
            clip_gradients(engine.optimizer, self.max_norm, self.norm_type)
