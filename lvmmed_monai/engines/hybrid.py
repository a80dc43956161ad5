"""Workflows of the 2D-3D hybrid bundle (``bundles/lvmmed_hybrid3d``) on MONAI's engines.

* :class:`Joint3DTrainer`: MONAI's ``SupervisedTrainer`` running one step of joint 2D-3D pretraining (two
  views of a batch of volumes -> :class:`~lvmmed_monai.ssl.joint3d.Joint3DLoss` -> optimizer step), so that
  MONAI's handlers (stats, TensorBoard, checkpoints) drive it unchanged;
* :func:`load_stage_checkpoint`: start a pretraining stage from the previous stage's checkpoint;
* :func:`load_hybrid_backbone`: put pretrained f_intra + f_inter into a segmentation or classification network;
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.engines import SupervisedTrainer
from torch import nn
from torch.optim import Optimizer

from lvmmed_monai.config_values import optional_path
from lvmmed_monai.data.sampling import derive_seed
from lvmmed_monai.engines.handlers import latest_checkpoint
from lvmmed_monai.engines.step import amp_step
from lvmmed_monai.ssl.joint3d import Joint3DLoss

__all__ = ["Joint3DTrainer", "resolve_checkpoint", "load_stage_checkpoint",
           "load_hybrid_backbone"]

logger = logging.getLogger(__name__)


def resolve_checkpoint(path: str | os.PathLike) -> str:
    """A checkpoint file, or the latest ``*iteration=N.pt`` of a checkpoint folder; a clear error when none."""
    p = Path(path)
    if p.is_file():
        return str(p)
    found = latest_checkpoint(p) if p.is_dir() else None
    if found is None:
        raise FileNotFoundError(f"no checkpoint at {p} (a .pt file or a folder of checkpoint_*iteration=N.pt); "
                                "run the previous step first, or pass the right path")
    return found


def load_stage_checkpoint(path: str | os.PathLike | None, objects: Mapping[str, nn.Module],
                          map_location: Any = "cpu") -> str | None:
    """Load ``objects`` (e.g. ``{"backbone": net, "criterion": loss}``) from a pretraining checkpoint (a file,
    or a stage's checkpoint folder: its latest checkpoint); the optimizer and engine state are not taken, so
    the next stage starts its own schedule. ``path`` None (or "null") does nothing. Returns the file read."""
    if optional_path(path) is None:
        return None
    file = resolve_checkpoint(path)
    state = torch.load(file, map_location=map_location, weights_only=True)
    missing = sorted(set(objects) - set(state))
    if missing:
        raise ValueError(f"{file} holds {sorted(state)}, not {missing}: pass a joint 2D-3D pretraining checkpoint")
    for name, module in objects.items():
        module.load_state_dict(state[name])
    logger.info("started from %s (%s)", file, ", ".join(objects))
    return file


def load_hybrid_backbone(net: nn.Module, path: str | os.PathLike | None, map_location: Any = "cpu") -> nn.Module:
    """Load pretrained f_intra (``encoder.*``) and f_inter (``inter.*``) into a hybrid network (backbone,
    classifier or segmentation network) and return it; the heads (decoder, context maps, classifier) keep
    their initialisation. ``path``: the ``hybrid_backbone.pt`` a pretraining stage exports, or one of its
    checkpoints (file or folder); None (or "null") returns ``net`` unchanged."""
    if optional_path(path) is None:
        return net
    file = resolve_checkpoint(path)
    state = torch.load(file, map_location=map_location, weights_only=True)
    state = state.get("backbone", state)
    parts = {"encoder": {}, "inter": {}}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head in parts:
            parts[head][rest] = value
    if not parts["encoder"] or not parts["inter"]:
        raise ValueError(f"{file} holds no hybrid backbone (encoder.* and inter.* keys); pass the hybrid_backbone.pt "
                       "or a checkpoint of the pretraining config")
    try:
        net.f_intra.load_state_dict(parts["encoder"])
        net.inter.load_state_dict(parts["inter"])
    except RuntimeError as err:
        raise RuntimeError(f"{file} does not fit this network (same encoder, in_channels and inter_kwargs as the "
                           f"pretraining run?): {str(err)[:400]}") from err
    logger.info("loaded the pretrained hybrid backbone (f_intra + f_inter) from %s", file)
    return net


class Joint3DTrainer(SupervisedTrainer):
    """``SupervisedTrainer`` running joint 2D-3D SSL on batches of two views ``(B, C, D, H, W)`` (+ ``lengths``).

    Args:
        device, max_epochs, train_data_loader, epoch_length, train_handlers: as for ``SupervisedTrainer``.
        network: a hybrid network (:class:`~lvmmed_monai.networks.LVMMedHybridBackbone`), its training stage
            set by :func:`~lvmmed_monai.ssl.joint3d.set_training_stage`.
        criterion: the :class:`~lvmmed_monai.ssl.joint3d.Joint3DLoss` of that stage.
        optimizer: over the parameters ``set_training_stage`` returned.
        view_keys / lengths_key: batch keys of the two views and of the real depths (absent: no padding).
        seed: seeds the per-iteration generator of the slice masks ``(seed, iteration)``.
        clip_grad_norm: max global gradient norm (None or 0: no clipping; the norm is still reported).
        amp: float16 autocast with a gradient scaler, on CUDA only (ignored on CPU).

    Each iteration returns 0-d tensors ``loss``, one per computed term (``intra``, ``inter``, ``mask``,
    ``graph_matching``), ``grad_norm``, and the float ``lr``.
    """

    def __init__(self, device: str | torch.device, max_epochs: int, train_data_loader: Any, network: nn.Module,
                 criterion: Joint3DLoss, optimizer: Optimizer, view_keys: Sequence[str] = ("view_s", "view_t"),
                 lengths_key: str = "lengths", seed: int = 0, clip_grad_norm: float | None = None,
                 amp: bool = False, epoch_length: int | None = None, train_handlers: Sequence | None = None) -> None:
        if not isinstance(criterion, Joint3DLoss):
            raise TypeError(f"criterion must be a Joint3DLoss, got {type(criterion).__name__}")
        device = torch.device(device)
        super().__init__(device=device, max_epochs=max_epochs, train_data_loader=train_data_loader, network=network,
                         optimizer=optimizer, loss_function=criterion, epoch_length=epoch_length,
                         train_handlers=train_handlers, amp=False, decollate=False)
        self.criterion, self.view_keys, self.lengths_key = criterion, tuple(view_keys), lengths_key
        self.seed, self.clip_grad_norm = int(seed), clip_grad_norm
        self.use_amp = bool(amp) and device.type == "cuda"
        self.grad_scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.generator = torch.Generator(device=device)

    def _iteration(self, engine: Joint3DTrainer, batchdata: dict[str, Any]) -> dict:
        missing = [k for k in self.view_keys if k not in batchdata]
        if missing:
            raise ValueError(f"batch lacks {missing}: the data pipeline must give two views {list(self.view_keys)}")
        dev = engine.state.device
        view_s, view_t = (torch.as_tensor(batchdata[k]).to(dev, non_blocking=engine.non_blocking)
                          for k in self.view_keys)
        lengths = batchdata.get(self.lengths_key)
        lengths = None if lengths is None else torch.as_tensor(lengths).to(dev)
        self.generator.manual_seed(derive_seed(self.seed, engine.state.iteration))
        engine.network.train()
        self.criterion.train()
        loss, terms, grad_norm = amp_step(
            engine.optimizer, self.grad_scaler,
            lambda: self.criterion(engine.network, view_s, view_t, lengths, generator=self.generator),
            dev.type, self.use_amp, self.clip_grad_norm)
        out: dict = {"loss": loss.detach(), **terms, "grad_norm": grad_norm.detach(),
                     "lr": float(engine.optimizer.param_groups[0]["lr"])}
        engine.state.output = out
        return out
