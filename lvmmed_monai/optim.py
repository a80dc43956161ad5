"""Fine-tuning a pretrained encoder: encoder/decoder parameter groups and a warm-up + poly schedule."""

from __future__ import annotations

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["encoder_decoder_param_groups", "WarmupPolyLR"]


def encoder_decoder_param_groups(
    network: nn.Module, lr: float, encoder_lr_scale: float = 0.1, encoder_attr: str = "encoder"
) -> list[dict]:
    """Two parameter groups: the pretrained ``network.<encoder_attr>`` at ``lr * encoder_lr_scale``, the rest at
    ``lr``. Frozen parameters (``requires_grad=False``) are left out. Each group keeps ``initial_lr``."""
    encoder = getattr(network, encoder_attr, None)
    if encoder is None:
        raise ValueError(f"{type(network).__name__} has no `{encoder_attr}` module")
    enc_ids = {id(p) for p in encoder.parameters()}
    enc = [p for p in encoder.parameters() if p.requires_grad]
    rest = [p for p in network.parameters() if p.requires_grad and id(p) not in enc_ids]
    groups = [{"params": rest, "lr": lr, "initial_lr": lr, "name": "decoder"}]
    if enc:
        groups.append({"params": enc, "lr": lr * encoder_lr_scale, "initial_lr": lr * encoder_lr_scale,
                       "name": "encoder"})
    return groups


class WarmupPolyLR(LRScheduler):
    """Linear warm-up over ``warmup_steps`` then nnU-Net's poly decay ``(1 - t / max_steps) ** exponent``,
    applied to each group's own ``initial_lr`` (nnU-Net's ``PolyLRScheduler`` sets one lr for all groups,
    which would erase the lower encoder rate). ``step(current_step)`` takes the epoch as nnU-Net calls it."""

    def __init__(self, optimizer: Optimizer, max_steps: int, warmup_steps: int = 0, exponent: float = 0.9) -> None:
        if max_steps < 1 or warmup_steps < 0:
            raise ValueError(f"max_steps must be >= 1 and warmup_steps >= 0, got {max_steps}, {warmup_steps}")
        self.max_steps, self.warmup_steps, self.exponent = max_steps, warmup_steps, exponent
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.ctr = 0
        super().__init__(optimizer)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        return max(0.0, 1 - step / self.max_steps) ** self.exponent

    def get_lr(self) -> list[float]:
        return [g["initial_lr"] * self.factor(max(self.last_epoch, 0)) for g in self.optimizer.param_groups]

    def step(self, current_step: int | None = None) -> None:  # type: ignore[override]
        if current_step is None:
            current_step, self.ctr = self.ctr, self.ctr + 1
        self.last_epoch = current_step
        for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            group["lr"] = lr
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]
