"""Handlers for the pretraining engine: atomic checkpoints, resume-from-latest, encoder export, progress bar.

MONAI's ``CheckpointSaver`` writes with ``atomic=False`` (to keep group read permission), so a run killed
while saving leaves a truncated ``.pt`` that "resume from the latest checkpoint" would pick;
:class:`AtomicCheckpointSaver` writes to a temporary file and renames it (then sets the usual permissions).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

from ignite.engine import Engine, Events
from ignite.handlers import DiskSaver
from ignite.handlers import ProgressBar as _IgniteProgressBar
from monai.handlers import CheckpointLoader, CheckpointSaver
from torch import nn

from lvmmed_monai.weights import export_encoder

__all__ = ["AtomicCheckpointSaver", "latest_checkpoint", "attach_checkpointing", "EncoderExportHandler",
           "PretrainProgressBar", "FirstOrderWarmup"]

logger = logging.getLogger(__name__)
_ITERATION = re.compile(r"iteration=(\d+)\.pt$")


class _AtomicDiskSaver(DiskSaver):
    """ignite's DiskSaver with ``atomic=True``, a fixed filename option, and ``0o644 & ~umask`` permissions."""

    def __init__(self, dirname: str, filename: str | None = None) -> None:
        super().__init__(dirname=dirname, require_empty=False, atomic=True)
        self.filename = filename

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        filename = self.filename or filename
        super().__call__(checkpoint, filename, metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(os.path.join(self.dirname, filename), 0o644 & ~umask)

    def remove(self, filename: str) -> None:
        super().remove(self.filename or filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI ``CheckpointSaver`` whose files are written atomically (same arguments, same file names)."""

    def __init__(self, save_dir: str, save_dict: dict, **kwargs) -> None:
        super().__init__(save_dir, save_dict, **kwargs)
        for ckpt in (self._interval_checkpoint, self._final_checkpoint, self._key_metric_checkpoint):
            if ckpt is not None:
                ckpt.save_handler = _AtomicDiskSaver(save_dir, getattr(ckpt.save_handler, "filename", None))


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> str | None:
    """The checkpoint of the highest iteration in ``ckpt_dir`` (``*iteration=N.pt``, as CheckpointSaver names
    them; the final one wins a tie), or None when there is none."""
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), "final" in p.name, p) for p in folder.glob("*.pt") if (m := _ITERATION.search(p.name))]
    return str(max(found)[2]) if found else None


def attach_checkpointing(
    engine: Engine,
    ckpt_dir: str | os.PathLike,
    save_dict: dict,
    save_interval: int,
    n_saved: int | None = 2,
    save: bool = True,
    resume: bool = False,
    map_location: object = None,
) -> str | None:
    """Checkpoint every ``save_interval`` iterations and at the end (atomic files in ``ckpt_dir``, keeping the
    ``n_saved`` latest); with ``resume``, first load the latest checkpoint of ``ckpt_dir`` into ``save_dict``
    when the run starts (a warning, and a fresh start, when there is none). Returns the resumed file.

    ``save_dict`` should hold everything a run's continuation depends on: networks, optimizer, lr scheduler,
    the trainer (iteration, epoch), the grad scaler and :class:`~lvmmed_monai.engines.pretrain.RNGState`.
    """
    path = latest_checkpoint(ckpt_dir) if resume else None
    if resume and path is None:
        logger.warning("resume=True but %s holds no checkpoint; starting from scratch", ckpt_dir)
    if path is not None:
        logger.info("resuming from %s", path)
        CheckpointLoader(load_path=path, load_dict=save_dict, map_location=map_location).attach(engine)
    if save:
        AtomicCheckpointSaver(str(ckpt_dir), save_dict, save_final=True, save_interval=save_interval,
                              epoch_level=False, n_saved=n_saved).attach(engine)
    return path


class EncoderExportHandler:
    """At the end of training, write the encoder in the official LVM-Med layout (+ adaptation plan).

    Args:
        encoder: the trained encoder (not the DDP wrapper). path: output weights file.
        patch_size: the pretraining image size, recorded in ``adaptation_plan.json``.
        enabled: False on non-zero ranks.
    """

    def __init__(self, encoder: nn.Module, path: str | os.PathLike, patch_size: tuple[int, int] = (224, 224),
                 enabled: bool = True) -> None:
        self.encoder, self.path, self.patch_size, self.enabled = encoder, Path(path), tuple(patch_size), enabled

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if self.enabled:
            path = export_encoder(self.encoder, self.path, patch_size=self.patch_size)
            logger.info("exported the encoder (official LVM-Med layout) to %s", path)


class PretrainProgressBar(_IgniteProgressBar):
    """ignite's tqdm progress bar showing the loss and the matching accuracy; ``attach(engine)`` only, as
    MONAI bundle handler lists call it."""

    def __init__(self, enabled: bool = True, persist: bool = True, **kwargs) -> None:
        super().__init__(persist=persist, **kwargs)
        self.enabled = enabled

    def attach(self, engine: Engine, *args, **kwargs) -> None:  # type: ignore[override]
        if self.enabled:
            super().attach(engine, output_transform=lambda out: {k: float(out[k]) for k in ("loss", "accuracy")})


class FirstOrderWarmup:
    """Solve the noise-free first-order matching (LAP on ``c_v``) for the first ``iterations`` iterations, then
    the criterion's own objective (second order and noise as configured).

    Why: the paper starts from ImageNet (ResNet-50) or SAM (ViT) weights, whose features already give the two
    views of a batch similar kNN graphs. From a random initialisation they do not: the identity then shares
    few kNN edges between the views, the second-order term favours other matchings, and Gumbel noise of
    scale 1 swamps vertex affinities that differ by ~0.02. On 5 fixed batches of the built-in collection
    (ResNet-50, 64 px, batch 32, the same views replayed) the full objective from random init left view
    retrieval at chance, while the first-order noise-free matching learned them (LAP accuracy 0.03 -> 0.69
    in 60 iterations) and the full objective switched on after that kept improving (0.88 after 20 more).
    With fresh views every epoch, 150 iterations were not enough for either (see docs/ssl.md). The switch
    depends on the iteration count only, so a resumed run switches at the same iteration.

    Args:
        criterion: the :class:`~lvmmed_monai.ssl.LVMMedLoss` (its ``second_order`` and ``noise_scale`` are
            set at every iteration start).
        iterations: warm-up length (0: no warm-up, the paper's objective from the first iteration).
    """

    def __init__(self, criterion: nn.Module, iterations: int = 0) -> None:
        if iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {iterations}")
        self.criterion, self.iterations = criterion, int(iterations)
        self.second_order, self.noise_scale = criterion.second_order, criterion.noise_scale

    def attach(self, engine: Engine) -> None:
        if self.iterations:
            engine.add_event_handler(Events.ITERATION_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        warm = engine.state.iteration <= self.iterations  # ignite counts iterations from 1
        self.criterion.second_order = False if warm else self.second_order
        self.criterion.noise_scale = 0.0 if warm else self.noise_scale
        if engine.state.iteration == self.iterations + 1:
            logger.info("first-order warm-up done after %d iterations: second_order=%s, noise_scale=%s",
                        self.iterations, self.second_order, self.noise_scale)
