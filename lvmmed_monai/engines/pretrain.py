"""GM-SSL pretraining on MONAI's engine: the model, the trainer's iteration and the schedule.

:class:`LVMMedPretrainTrainer` is MONAI's ``SupervisedTrainer`` with LVM-Med's iteration (two views and
their coordinate maps -> ``encoder.feature_map`` -> :class:`~lvmmed_monai.ssl.LVMMedLoss` -> Adam step), so
that MONAI's handlers (stats, TensorBoard, checkpoints, lr schedule) and bundle configs drive it unchanged.

Reproducibility: the Gumbel noise of iteration ``i`` is a function of ``(seed, i, global graph index)`` per
graph (:class:`~lvmmed_monai.ssl.imle.NoiseKey`), so 1 or N processes draw the same noise for a global batch,
and the views of each sample from its own seed (:mod:`lvmmed_monai.data.sampling`), so a run resumed from a
checkpoint replays the same losses without restoring any random stream; the torch RNG is checkpointed as
well (:class:`RNGState`) for anything else that draws from it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import torch
from ignite.engine import Events
from ignite.metrics import Average, Metric
from monai.engines import SupervisedTrainer
from monai.networks.nets import ResNetFeatures
from torch import nn
from torch.optim import Optimizer

from lvmmed_monai.data.sampling import GlobalBatchSampler, derive_seed
from lvmmed_monai.engines.step import amp_step
from lvmmed_monai.process_group import get_rank, get_world_size, is_distributed
from lvmmed_monai.ssl.imle import NoiseKey
from lvmmed_monai.ssl.loss import LVMMedLoss, LVMMedLossOutput

__all__ = ["LVMMedPretrainModel", "LVMMedPretrainTrainer", "RNGState", "halving_milestones", "view_inputs", "STAT_KEYS",
           "VIEW_KEYS"]

STAT_KEYS = ("accuracy", "identity_rate", "objective", "identity_objective", "hamming", "retrieval_accuracy")
VIEW_KEYS = ("image_s", "image_t", "coords_s", "coords_t")


def view_inputs(batch: Mapping[str, torch.Tensor], device: str | torch.device, non_blocking: bool = False) -> dict:
    """A collated :class:`~lvmmed_monai.ssl.LVMMedViewsd` batch -> :class:`LVMMedPretrainModel`'s keyword
    arguments on ``device``: the two global views and their coordinates, and the multi-crop local views
    ``image_l0, image_l1, ...`` (with ``coords_l*``) as the lists ``local_images`` / ``local_coords``."""
    missing = [k for k in VIEW_KEYS if k not in batch]
    if missing:
        raise ValueError(f"batch lacks {missing} (it has {sorted(batch)}); the data pipeline must end with "
                         "LVMMedViewsd('image')")
    x = {k: batch[k].to(device, non_blocking=non_blocking) for k in VIEW_KEYS}
    m = 0
    while f"image_l{m}" in batch:
        m += 1
    if m:
        x["local_images"] = [batch[f"image_l{j}"].to(device, non_blocking=non_blocking) for j in range(m)]
        x["local_coords"] = [batch[f"coords_l{j}"].to(device, non_blocking=non_blocking) for j in range(m)]
    return x


def halving_milestones(total_iterations: int, num_halvings: int = 4) -> list[int]:
    """Iterations at which the lr halves: ``num_halvings`` evenly spaced steps (the paper halves its lr four
    times over training; at 1/5 .. 4/5 of the run here), for ``torch.optim.lr_scheduler.MultiStepLR``."""
    if total_iterations < 1 or num_halvings < 0:
        raise ValueError(f"need total_iterations >= 1 and num_halvings >= 0, got {total_iterations}, {num_halvings}")
    return [max(1, total_iterations * i // (num_halvings + 1)) for i in range(1, num_halvings + 1)]


class LVMMedPretrainModel(nn.Module):
    """Encoder + :class:`LVMMedLoss` (projector, GCN) as one module, the unit that DDP wraps and Adam trains.

    ``world_size`` makes a multi-process step equal a 1-process step on the global batch. With the criterion's
    ``imle_step="per_graph"`` (default) IMLE's step does not depend on how the graphs are spread over
    processes, and DDP's gradient averaging does the rest. With ``"per_loss"`` the backward solve moves the
    costs by ``lam * dL/dX``, and with ``reduction="mean"`` dL/dX carries ``1 / G`` for the ``G`` graphs of a
    process, not of the global batch; so the model passes ``lam / world_size`` to each match (``imle_lam``;
    the criterion's own ``lam`` is left as configured; the gradient, ``(X - X') / lam``, then comes out
    ``world_size`` times larger, which DDP's averaging undoes). With ``reduction="sum"`` the loss is also
    multiplied by ``world_size``. ``second_order`` / ``noise_scale`` in ``forward`` override the criterion's for
    one step (:class:`~lvmmed_monai.engines.FirstOrderWarmup`).

    Multi-crop (``local_images``, the paper's "multi-crop techniques as [VICRegL]"): local crop ``j`` of every
    image forms its own graphs, matched against the global view ``s`` (even ``j``) or ``t`` (odd ``j``) with
    the same criterion (projector, GCN, affinities of views of different sizes, IMLE); the loss is the mean
    over the global pair and the ``m`` global-local pairs. The statistics are those of the global pair.

    ``local_level`` (``"layer1"`` .. ``"layer4"``, ResNet-50 only): the local cost of Eq. 3 compares the maps of
    that stage instead of the last one. Why: at 64 px the last stage is 2 x 2, so its "local" cost is nearly a
    second global term; layer3 is 4 x 4 there (the paper's 224 px views give layer4 7 x 7). A list of stages
    (e.g. ``["layer2", "layer4"]``) makes the local cost the mean of theirs. None: the last stage, as the paper.

    Besides :class:`LVMMedLoss`'s statistics it reports ``retrieval_accuracy``: the share of images whose
    highest vertex affinity ``c_v`` (Eq. 3, no noise) is with their own other view. The matching
    ``accuracy`` is measured on the solver's Gumbel-perturbed matching, so it stays low (noise of scale 1 on
    affinities in [-1, 1]) even for good features; retrieval shows the features' progress directly.
    """

    LOCAL_LEVELS = {"layer1": 1, "layer2": 2, "layer3": 3, "layer4": 4}  # indices into level_maps

    def __init__(self, encoder: nn.Module, criterion: LVMMedLoss, world_size: int | None = None,
                 local_level: str | Sequence[str] | None = None) -> None:
        super().__init__()
        names = [] if local_level is None else [local_level] if isinstance(local_level, str) else list(local_level)
        bad = [name for name in names if name not in self.LOCAL_LEVELS]
        if bad or (local_level is not None and not names):
            raise ValueError(f"local_level must be one of {sorted(self.LOCAL_LEVELS)}, a list of them, or None; got "
                             f"{local_level!r}")
        # None: the last stage serves the local cost (the paper); else the indices of level_maps' stages
        self.local_index = None if names in ([], ["layer4"]) else [self.LOCAL_LEVELS[name] for name in names]
        if self.local_index is not None and not isinstance(encoder, ResNetFeatures):
            raise ValueError(f"local_level={local_level!r} needs a ResNet encoder (stage maps); "
                             f"{type(encoder).__name__} has one feature map: leave local_level null")
        if not hasattr(encoder, "feature_map"):
            raise TypeError(f"{type(encoder).__name__} has no feature_map(); use lvmmed_monai.load_encoder")
        if getattr(encoder, "feature_dim", criterion.in_dim) != criterion.in_dim:
            raise ValueError(f"LVMMedLoss(in_dim={criterion.in_dim}) does not match the encoder's feature_dim "
                             f"{encoder.feature_dim}; set in_dim to it (2048 for ResNet-50, 768 for ViT-B)")
        self.encoder, self.criterion = encoder, criterion
        self.world_size = int(world_size if world_size is not None else get_world_size())
        per_loss = getattr(criterion, "imle_step", "per_loss") == "per_loss"
        self.imle_lam = criterion.lam / self.world_size if per_loss else criterion.lam

    def forward(self, image_s: torch.Tensor, image_t: torch.Tensor, coords_s: torch.Tensor,
                coords_t: torch.Tensor, generator: torch.Generator | NoiseKey | None = None,
                local_images: Sequence[torch.Tensor] = (), local_coords: Sequence[torch.Tensor] = (),
                second_order: bool | None = None, noise_scale: float | None = None) -> LVMMedLossOutput:
        over = {"second_order": second_order, "noise_scale": noise_scale, "lam": self.imle_lam}
        n = image_s.shape[0]
        if image_s.shape == image_t.shape:  # one encoder pass for both views
            feats, maps = self._features(torch.cat([image_s, image_t]))
            feats_s, feats_t = feats.split(n)
            maps_s, maps_t = _chunks(maps, n) if maps is not None else (None, None)
        else:
            (feats_s, maps_s), (feats_t, maps_t) = self._features(image_s), self._features(image_t)
        aff = self.criterion.affinities(feats_s, feats_t, coords_s, coords_t, maps_s, maps_t)
        loss, stats = self.criterion.match(aff, generator, **over)
        if len(local_images) != len(local_coords):
            raise ValueError(f"{len(local_images)} local crops but {len(local_coords)} coordinate maps")
        if local_images:
            same = len({tuple(im.shape) for im in local_images}) == 1
            if same:
                f_all, m_all = self._features(torch.cat(list(local_images)))
                m_split = _chunks(m_all, n) if m_all is not None else [None] * len(local_images)
                feats_l = list(zip(f_all.split(n), m_split, strict=True))
            else:
                feats_l = [self._features(im) for im in local_images]
            losses = [loss]
            for j, ((f_l, m_l), c_l) in enumerate(zip(feats_l, local_coords, strict=True)):
                f_g, m_g, c_g = (feats_s, maps_s, coords_s) if j % 2 == 0 else (feats_t, maps_t, coords_t)
                aff_l = self.criterion.affinities(f_g, f_l, c_g, c_l, m_g, m_l)
                gen_l = generator.substream(j + 1) if isinstance(generator, NoiseKey) else generator
                losses.append(self.criterion.match(aff_l, gen_l, **over).loss)
            loss = torch.stack(losses).mean()
        with torch.no_grad():  # noise-free view retrieval: is each image's best c_v partner its own other view?
            best = aff.c_v.detach().argmax(-1)
            stats["retrieval_accuracy"] = (best == torch.arange(best.shape[-1], device=best.device)).float().mean()
        if self.criterion.reduction == "sum":
            loss = loss * self.world_size
        return LVMMedLossOutput(loss, stats)


    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """The last stage's maps (projector and global cost) and, with ``local_level``, the maps of its stages
        (local cost; None otherwise: the last stage serves both)."""
        if self.local_index is None:
            return self.encoder.feature_map(x), None
        levels = self.encoder.level_maps(x)
        return levels[-1], [levels[i] for i in self.local_index]


def _chunks(maps: list[torch.Tensor], n: int) -> list[list[torch.Tensor]]:
    """Stage maps of ``k * n`` images -> ``k`` lists of the stages' maps of ``n`` images each."""
    return [list(chunk) for chunk in zip(*(m.split(n) for m in maps), strict=True)]


class RNGState:
    """Checkpointable torch (CPU and CUDA) random state, for anything that draws from the global streams."""

    def state_dict(self) -> dict:
        state = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def epoch_means(keys: Sequence[str], prefix: str = "epoch_") -> dict[str, Metric]:
    """Ignite ``Average`` metrics of iteration outputs, one per key, named ``prefix + key``.

    Per-iteration matching accuracy on a batch of 16-image graphs moves by +-0.15 from one batch to the next;
    its mean over an epoch shows the trend. Attached as trainer metrics, MONAI's ``StatsHandler`` prints them
    and ``TensorBoardStatsHandler`` plots them at every epoch end.
    """
    return {f"{prefix}{key}": Average(output_transform=lambda out, key=key: out[key]) for key in keys}


class LVMMedPretrainTrainer(SupervisedTrainer):
    """``SupervisedTrainer`` running LVM-Med's iteration on batches of ``image_s, image_t, coords_s, coords_t``.

    Args:
        device, max_epochs, train_data_loader, train_handlers, epoch_length: as for ``SupervisedTrainer``.
        network: :class:`LVMMedPretrainModel`, possibly wrapped in DDP.
        optimizer: over the encoder's and the loss's parameters (``network.parameters()``).
        seed: with the iteration, keys the Gumbel noise: each graph's noise is a function of ``(seed, iteration,
            global graph index)`` (:class:`~lvmmed_monai.ssl.imle.NoiseKey`), so N processes draw exactly the
            noise one process would on the same global batch.
        clip_grad_norm: max global gradient norm (None: no clipping; the norm is still reported).
        amp: float16 autocast with a gradient scaler; used on CUDA only (ignored on CPU).
        key_train_metric / additional_metrics: ignite metrics over the iteration outputs, as for
            ``SupervisedTrainer`` (the bundle attaches epoch means, :func:`epoch_means`).

    Each iteration returns (and puts in ``engine.state.output``) 0-d tensors ``loss``, the
    :data:`STAT_KEYS` (those of :class:`LVMMedLoss` and ``retrieval_accuracy``), ``grad_norm``, and floats
    ``lr``, ``images_per_s`` (global images per second, data loading and handlers included) and ``step_s``
    (seconds of this iteration's own work: transfer, forward, backward, optimizer step). In a process group
    the tensors are averaged over the processes.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: torch.utils.data.DataLoader,
        network: nn.Module,
        optimizer: Optimizer,
        seed: int = 0,
        clip_grad_norm: float | None = 3.0,
        amp: bool = False,
        epoch_length: int | None = None,
        train_handlers: Sequence | None = None,
        key_train_metric: dict[str, Metric] | None = None,
        additional_metrics: dict[str, Metric] | None = None,
        non_blocking: bool = True,
    ) -> None:
        model = network.module if isinstance(network, nn.parallel.DistributedDataParallel) else network
        if not isinstance(model, LVMMedPretrainModel):
            raise TypeError(f"network must be an LVMMedPretrainModel (or DDP around one), got {type(model).__name__}")
        device = torch.device(device)
        super().__init__(device=device, max_epochs=max_epochs, train_data_loader=train_data_loader,
                         network=network, optimizer=optimizer, loss_function=model.criterion,
                         epoch_length=epoch_length, non_blocking=non_blocking, train_handlers=train_handlers,
                         key_train_metric=key_train_metric, additional_metrics=additional_metrics,
                         amp=False, decollate=False)
        self.model, self.seed, self.clip_grad_norm = model, int(seed), clip_grad_norm
        self.use_amp = bool(amp) and device.type == "cuda"
        self.grad_scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.rank, self.world_size = get_rank(), get_world_size()
        self._last_end: float | None = None
        sampler = getattr(train_data_loader, "sampler", None)
        if isinstance(sampler, GlobalBatchSampler):
            self.add_event_handler(Events.EPOCH_STARTED, self._resume_position, sampler)
        self.add_event_handler(Events.STARTED, self._reset_clock)

    def _reset_clock(self, _engine: LVMMedPretrainTrainer) -> None:
        self._last_end = None

    @staticmethod
    def _resume_position(engine: LVMMedPretrainTrainer, sampler: GlobalBatchSampler) -> None:
        """After a resume mid-epoch, skip the batches of this epoch that were already trained."""
        done = engine.state.iteration - (engine.state.epoch - 1) * (engine.state.epoch_length or 0)
        sampler.set_start_batch(max(0, done))

    def _iteration(self, engine: LVMMedPretrainTrainer, batchdata: dict[str, torch.Tensor]) -> dict:
        start = time.perf_counter()
        x = view_inputs(batchdata, engine.state.device, engine.non_blocking)
        graphs = x["image_s"].shape[0] // self.model.criterion.graph_size  # this process's graphs
        noise = NoiseKey(derive_seed(self.seed, engine.state.iteration), graph_offset=self.rank * graphs)
        engine.network.train()
        overrides = getattr(engine.state, "loss_overrides", None) or {}  # FirstOrderWarmup's, this iteration
        loss, stats, grad_norm = amp_step(engine.optimizer, self.grad_scaler,
                                          lambda: engine.network(**x, generator=noise, **overrides),
                                          engine.state.device.type, self.use_amp, self.clip_grad_norm)
        values = torch.stack([loss.detach().float(), *(stats[k].float() for k in STAT_KEYS), grad_norm.float()])
        if is_distributed():
            torch.distributed.all_reduce(values)
            values = values / self.world_size
        out: dict = dict(zip(("loss", *STAT_KEYS, "grad_norm"), values.unbind(), strict=True))
        out["lr"] = float(engine.optimizer.param_groups[0]["lr"])
        end = time.perf_counter()
        out["step_s"] = end - start
        batch = x["image_s"].shape[0] * self.world_size
        out["images_per_s"] = batch / (end - (self._last_end if self._last_end is not None else start))
        self._last_end = end
        engine.state.output = out
        return out
