"""Handlers for the pretraining engine: atomic checkpoints, resume-from-latest, encoder export,
first-order warm-up and an online kNN probe of the encoder.

MONAI's ``CheckpointSaver`` writes with ``atomic=False`` (to keep group read permission), so a run killed
while saving leaves a truncated ``.pt`` that "resume from the latest checkpoint" would pick;
:class:`AtomicCheckpointSaver` writes to a temporary file and renames it (then sets the usual permissions).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from ignite.handlers import DiskSaver
from monai.handlers import CheckpointLoader, CheckpointSaver
from torch import nn

from lvmmed_monai.weights import export_encoder

__all__ = ["AtomicCheckpointSaver", "latest_checkpoint", "attach_checkpointing", "EncoderExportHandler",
           "FirstOrderWarmup", "OnlineProbe"]

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


class FirstOrderWarmup:
    """Solve the noise-free first-order matching (LAP on ``c_v``) for the first ``iterations`` iterations, then
    the criterion's own objective (second order and noise as configured).

    Why: the paper starts from ImageNet (ResNet-50) or SAM (ViT) weights, whose features already give the two
    views of a batch similar kNN graphs. From a random initialisation they do not: the identity then shares
    few kNN edges between the views, the second-order term favours other matchings, and Gumbel noise of
    scale 1 swamps vertex affinities that differ by ~0.02; the noise-free first-order matching learns from
    there, and the full objective keeps improving once switched on (measurements: docs/ssl.md, "Training from
    a random initialisation"). The switch depends on the iteration count only, so a resumed run switches at
    the same iteration.

    It changes nothing on the criterion: at every iteration start it puts this iteration's overrides in
    ``engine.state.loss_overrides`` (``{"second_order": False, "noise_scale": 0.0}`` during the warm-up, ``{}``
    after), which :class:`~lvmmed_monai.engines.LVMMedPretrainTrainer` passes to the model's forward; a loop
    of one's own calls :meth:`overrides` with the iteration.

    Args:
        criterion: the :class:`~lvmmed_monai.ssl.LVMMedLoss` (read for the log line: its configured objective).
        iterations: warm-up length (0: no warm-up, the paper's objective from the first iteration).
    """

    def __init__(self, criterion: nn.Module, iterations: int = 0) -> None:
        if iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {iterations}")
        self.iterations = int(iterations)
        self.second_order, self.noise_scale = criterion.second_order, criterion.noise_scale

    def attach(self, engine: Engine) -> None:
        if self.iterations:
            engine.add_event_handler(Events.ITERATION_STARTED, self)

    def overrides(self, iteration: int) -> dict:
        """The criterion overrides of ``iteration`` (counted from 1, as ignite does)."""
        return {"second_order": False, "noise_scale": 0.0} if iteration <= self.iterations else {}

    def __call__(self, engine: Engine) -> None:
        engine.state.loss_overrides = self.overrides(engine.state.iteration)
        if engine.state.iteration == self.iterations + 1:
            logger.info("first-order warm-up done after %d iterations: second_order=%s, noise_scale=%s",
                        self.iterations, self.second_order, self.noise_scale)


class OnlineProbe:
    """Every ``interval`` epochs and at the last one, the kNN accuracy of the current encoder, frozen, on a small
    labelled hold-out, into ``engine.state.metrics[name]`` (as solo-learn's online kNN probe).

    Why: the training statistics (matching and retrieval accuracy) say whether the pretext task is learned, not
    whether the features separate anything else; this tracks that during the run at a few seconds per probe.

    It leaves training untouched: the encoder runs in eval mode (no BatchNorm running-statistic updates) under
    ``torch.no_grad()`` on the device it is on, its train/eval mode is restored afterwards, and the hold-out
    is built once, on first use, from ``seed`` alone (own numpy / torch generators; no global random stream is
    drawn from). Attached at ``EPOCH_COMPLETED``, it must come before MONAI's ``StatsHandler`` and
    ``TensorBoardStatsHandler`` in the handler list (handlers fire in attach order) for their epoch line and
    plot to include the value. On the epochs it skips, the key is removed from the metrics, so the epoch line
    and TensorBoard show only measured values (no stale repeats).

    Args:
        encoder: the encoder being trained (not a DDP wrapper), with ``feature_map``.
        image_size: hold-out image size (the pretraining view size).
        encoder_name: picks the input normalisation (:func:`~lvmmed_monai.encoders.input_normalization`).
        interval: epochs between probes (0: disabled).
        data: None for generated shape phantoms (``num_train`` + ``num_test``, 4 classes), or a folder with one
            sub-folder of 2D images per class (split 50/50 by a permutation seeded with ``seed``).
        num_train, num_test: hold-out sizes for the phantoms.
        k: neighbours of the cosine kNN vote.
        seed: seeds the hold-out (the phantoms use ``seed + 1000``, as ``evaluate.yaml``'s probes).
        enabled: False on non-zero ranks.
        device: the device the encoder trains on (None: that of its parameters); the probe never moves it.
        name: the metric name. batch_size: images per encoder pass.
    """

    def __init__(self, encoder: nn.Module, image_size: int, encoder_name: str = "lvmmed_resnet50",
                 interval: int = 5, data: str | os.PathLike | None = None, num_train: int = 200,
                 num_test: int = 200, k: int = 10, seed: int = 0, enabled: bool = True,
                 device: str | torch.device | None = None, name: str = "probe_knn_accuracy",
                 batch_size: int = 64) -> None:
        if interval < 0:
            raise ValueError(f"interval must be >= 0, got {interval}")
        self.encoder, self.image_size, self.encoder_name = encoder, int(image_size), encoder_name
        self.interval, self.data, self.num_train, self.num_test = int(interval), data, int(num_train), int(num_test)
        self.k, self.seed, self.enabled, self.name, self.batch_size = int(k), int(seed), enabled, name, batch_size
        self.device = None if device is None else torch.device(device)
        self._holdout: tuple[torch.Tensor, ...] | None = None
        self._described = False

    def attach(self, engine: Engine) -> None:
        if self.enabled and self.interval:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def holdout(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(train_x, train_y, test_x, test_y)``, built on the first call and kept."""
        if self._holdout is None:
            from lvmmed_monai.evaluation import labeled_split

            self._holdout, _ = labeled_split(self.data, self.image_size, self.num_train, self.num_test, self.seed)
        return self._holdout

    def _device(self) -> torch.device:
        param = next(self.encoder.parameters(), None)
        here = param.device if param is not None else torch.device("cpu")
        want = self.device
        other_index = want is not None and None not in (want.index, here.index) and want.index != here.index
        if want is not None and (want.type != here.type or other_index):
            raise ValueError(f"OnlineProbe(device={self.device}) but the encoder is on {here}; the probe does "
                             "not move the encoder being trained")
        return here

    def compute(self) -> float:
        """The kNN accuracy of the encoder now (eval mode, no gradients; its mode is restored)."""
        from lvmmed_monai.encoders import input_normalization
        from lvmmed_monai.evaluation import embed, knn_accuracy

        device, was_training = self._device(), self.encoder.training
        xtr, ytr, xte, yte = self.holdout()
        mean, std = input_normalization(self.encoder_name)
        try:
            with torch.no_grad():
                ftr = embed(self.encoder, xtr, mean, std, batch_size=self.batch_size, device=device)
                fte = embed(self.encoder, xte, mean, std, batch_size=self.batch_size, device=device)
        finally:
            self.encoder.train(was_training)
        return knn_accuracy(ftr, ytr, fte, yte, k=self.k)

    def __call__(self, engine: Engine) -> None:
        epoch, last = engine.state.epoch, engine.state.max_epochs
        if epoch % self.interval and epoch != last:
            engine.state.metrics.pop(self.name, None)
            return
        start = time.perf_counter()
        value = self.compute()
        engine.state.metrics[self.name] = value
        # the value is in the epoch line (TrainingSummary); the hold-out is described once
        log = logger.debug if self._described else logger.info
        self._described = True
        log("epoch %d: online kNN probe (k=%d, %d train / %d test images) %s = %.4f (%.1f s)", epoch, self.k,
            len(self.holdout()[1]), len(self.holdout()[3]), self.name, value, time.perf_counter() - start)
