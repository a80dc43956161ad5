"""Sampling for graph-matching SSL that does not depend on the number of processes or on interruptions.

Two properties matter for LVM-Med pretraining and neither comes with ``DistributedSampler`` + a seeded
transform stream:

* graphs are consecutive ``graph_size`` samples of a process's batch, so which images share a graph must not
  change with the number of processes. ``DistributedSampler`` interleaves (rank ``r`` takes every ``W``-th
  index), so a 2-process run would build other graphs than a 1-process run; :class:`GlobalBatchSampler`
  instead cuts each *global* batch into ``W`` contiguous parts;
* resuming after an interruption must replay the same augmentations. A transform's random stream lives in
  each DataLoader worker and restarts with every epoch, so it cannot be restored mid-epoch; here every
  sample carries its own seed, a hash of ``(seed, epoch, position in the epoch)``, and
  :class:`SeededViewsDataset` re-seeds the random transform with it (counter-based randomness). The views of
  a sample are then the same on any number of workers or processes and after a resume.

:func:`dataset_weights` mixes the datasets of a collection (its sub-folders; LVM-Med draws from 55) equally or in
given shares, as weights for the sampler.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from monai.transforms import Randomizable
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

from lvmmed_monai.data.slice_cache import SliceIndex
from lvmmed_monai.data.views import share_random_state

__all__ = ["GlobalBatchSampler", "SeededViewsDataset", "derive_seed", "dataset_weights", "modality_weights"]


def derive_seed(*counters: int) -> int:
    """A 32-bit seed from integers (numpy's SeedSequence hashing: well mixed, reproducible everywhere)."""
    return int(np.random.SeedSequence([int(c) & 0xFFFFFFFF for c in counters]).generate_state(1)[0])


class GlobalBatchSampler(DistributedSampler):
    """Yields ``(index, seed)`` for this process: contiguous parts of global batches, seeded per sample.

    Each epoch draws ``num_samples`` indices (a permutation, or with ``weights`` a weighted draw with
    replacement, e.g. :func:`dataset_weights`), cuts them into global batches of
    ``global_batch_size`` (an incomplete last batch is dropped) and gives process ``rank`` the ``rank``-th of
    ``num_replicas`` contiguous parts of each. A 1-process run with batch ``B`` therefore sees exactly the
    concatenation of what ``W`` processes with batch ``B / W`` see. It subclasses ``DistributedSampler`` so
    that MONAI engines call :meth:`set_epoch` at each epoch start; :meth:`set_start_batch` skips batches
    already trained when a run resumes mid-epoch. ``global_batch_size`` must be a multiple of ``graph_size *
    num_replicas`` (graphs are consecutive ``graph_size`` samples of a process's batch), checked here, before
    a run starts.
    """

    def __init__(
        self,
        dataset: Sequence | Dataset,
        global_batch_size: int,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        weights: Sequence[float] | None = None,
        num_samples: int | None = None,
        graph_size: int = 1,
    ) -> None:
        if num_replicas is None or rank is None:
            dist = torch.distributed
            ready = dist.is_available() and dist.is_initialized()
            num_replicas = num_replicas if num_replicas is not None else (dist.get_world_size() if ready else 1)
            rank = rank if rank is not None else (dist.get_rank() if ready else 0)
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        size = len(dataset)  # type: ignore[arg-type]
        self.epoch_items = int(num_samples if num_samples is not None else size)
        step = int(graph_size) * num_replicas  # every process's batch is whole graphs
        if not isinstance(global_batch_size, int) or isinstance(global_batch_size, bool):
            raise TypeError(f"batch_size must be an integer, got {global_batch_size!r}: pass e.g. --batch_size "
                            f"{max(step, 32) // step * step}")
        if global_batch_size < 1 or global_batch_size % step:
            raise ValueError(f"batch_size {global_batch_size} must be a positive multiple of graph_size {graph_size}"
                             f" x {num_replicas} process(es) = {step} (each process's batch is whole graphs): set "
                             f"--batch_size {max(step, global_batch_size // step * step)} or a graph_size dividing it")
        if self.epoch_items < global_batch_size:
            raise ValueError(f"an epoch holds {self.epoch_items} samples, fewer than one global batch of "
                             f"{global_batch_size}: add data, lower the batch size or raise num_samples")
        if weights is not None and len(weights) != size:
            raise ValueError(f"{len(weights)} weights for {size} samples")
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // num_replicas
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        self.dataset_size = size
        self.start_batch = 0

    def set_start_batch(self, batch: int) -> None:
        """Skip the first ``batch`` batches of the current epoch (resume mid-epoch); reset with 0."""
        self.start_batch = int(batch)

    def batches_per_epoch(self) -> int:
        return self.epoch_items // self.global_batch_size

    def _order(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, 1))
        if self.weights is not None:
            return torch.multinomial(self.weights, self.epoch_items, replacement=True, generator=g)
        if not self.shuffle:
            return torch.arange(self.epoch_items) % self.dataset_size
        reps = -(-self.epoch_items // self.dataset_size)
        return torch.cat([torch.randperm(self.dataset_size, generator=g) for _ in range(reps)])[: self.epoch_items]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self._order().tolist()
        bsz, local = self.global_batch_size, self.local_batch_size
        for b in range(self.start_batch, self.batches_per_epoch()):
            first = b * bsz + self.rank * local
            for pos in range(first, first + local):
                yield order[pos], derive_seed(self.seed, self.epoch, pos, 2)

    def __len__(self) -> int:
        return self.batches_per_epoch() * self.local_batch_size


class SeededViewsDataset(Dataset):
    """``dataset[(index, seed)]`` = ``transform(base[index])`` with ``transform`` re-seeded by ``seed``.

    ``base`` is a MONAI ``Dataset``/``CacheDataset`` of the deterministic part (load, resize; cached), the
    random part (``LVMMedViewsd`` and what follows) runs here, so a sample's views depend only on its seed
    (see the module docstring). Plain integer indices use seed ``index``.
    """

    def __init__(self, base: Dataset, transform: Callable) -> None:
        if not isinstance(transform, Randomizable):
            raise TypeError(f"transform must be a MONAI Randomizable (e.g. Compose), got {type(transform).__name__}")
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        index, seed = (item, item) if isinstance(item, int) else item
        share_random_state(self.transform, np.random.RandomState(int(seed)))  # one seeding per sample
        return self.transform(self.base[int(index)])


def _dataset_labels(index: SliceIndex | Sequence[Mapping]) -> tuple[np.ndarray, list[str]]:
    if isinstance(index, SliceIndex):
        return index.dataset_ids, index.datasets
    names, ids = np.unique(np.array([str(e.get("dataset", e.get("modality"))) for e in index]), return_inverse=True)
    return ids, names.tolist()


def dataset_weights(index: SliceIndex | Sequence[Mapping], weights: str | Mapping[str, float] | None = None
                    ) -> np.ndarray | None:
    """Per-slice sampling weights that mix the datasets (sub-folders) of ``index`` in chosen shares, for
    :class:`~lvmmed_monai.data.sampling.GlobalBatchSampler` (weighted draws with replacement).

    ``weights``: None or ``"proportional"``: None (the sampler's permutation, each dataset in proportion to its
    slices); ``"equal"``: every dataset equally often (the bundle's ``modality_balanced``); ``{dataset: w}``: dataset
    drawn with share ``w / sum(w)``, every dataset named (0 leaves one out). Returns float64 ``(len(index),)``.
    """
    if weights is None or (isinstance(weights, str) and weights.strip().lower() in ("", "none", "null",
                                                                                    "proportional")):
        return None
    ids, names = _dataset_labels(index)
    if isinstance(weights, str) and weights.strip().lower() == "equal":
        share = np.ones(len(names))
    elif isinstance(weights, Mapping):
        given = {str(k): v for k, v in weights.items()}
        unknown, unnamed = sorted(set(given) - set(names)), sorted(set(names) - set(given))
        if unknown or unnamed:
            raise ValueError(f"dataset_weights must name every dataset (sub-folder) of the collection, {names}: "
                             f"unknown {unknown}, not named {unnamed}")
        share = np.array([float(given[n]) for n in names])
        if not (np.isfinite(share).all() and (share >= 0).all() and share.sum() > 0):
            raise ValueError(f"dataset_weights must be finite, >= 0 and not all 0, got {dict(given)}")
    else:
        raise ValueError(f"dataset_weights must be null, 'equal', 'proportional' or {{dataset: weight}}, got "
                         f"{weights!r}")
    counts = np.bincount(ids, minlength=len(names))
    return (share / share.sum() / np.maximum(counts, 1))[ids]


def modality_weights(index: SliceIndex | Sequence[Mapping]) -> np.ndarray:
    """Per-slice weights that draw each modality (dataset) equally often: ``dataset_weights(index, "equal")``."""
    return dataset_weights(index, "equal")
