"""The pretraining data pipeline as the bundle builds it: collection -> sharded slice cache and index -> cached
MONAI dataset -> seeded LVM-Med views.

Deterministic work (reading a cached slice) is cached by MONAI's ``CacheDataset`` over the index itself (a
:class:`~lvmmed_monai.data.slice_cache.SliceIndex` makes each entry on demand: no list of per-slice dicts), within
a stated share of the machine's memory (:func:`resolve_cache_rate`); the random views run per sample with the
sample's seed (:class:`~lvmmed_monai.data.sampling.SeededViewsDataset`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, Dataset
from monai.transforms import CastToTyped, Compose, NormalizeIntensityd, SelectItemsd

from lvmmed_monai.data.pretrain import LoadSliced, prepare_slices
from lvmmed_monai.data.sampling import SeededViewsDataset
from lvmmed_monai.data.slice_cache import SliceIndex
from lvmmed_monai.data.views import LVMMedViewsd
from lvmmed_monai.demo.phantoms import write_default_collection
from lvmmed_monai.process_group import get_rank

__all__ = ["pretrain_index", "pretrain_dataset", "resolve_cache_rate", "CACHED_SLICE_OVERHEAD"]

CACHED_SLICE_OVERHEAD = 400  # bytes a CacheDataset item holds besides its float16 pixels (dict, ndarray, list slot)


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def pretrain_index(
    data: str | os.PathLike | Sequence[str | os.PathLike | Mapping] | None,
    output_dir: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    workers: int | None = None,
    progress: bool | str = "auto",
    **slicing: Any,
) -> SliceIndex:
    """Slice index of ``data``: :func:`~lvmmed_monai.data.pretrain.prepare_slices` with its options ``slicing``
    (``axis``, ``percentiles``, ``min_slice_range``, ``on_error``, ``max_size``; their defaults there).

    ``data`` None or ``""`` uses the built-in generated collection, written once to
    ``output_dir/default_data`` (``seed``; by rank 0, the others wait for it). Slices are cached in ``cache_dir``
    (default ``output_dir/slice_cache``). In a process group every rank prepares its share of the files with
    ``workers`` processes (None: the machine's cores shared by its ranks), then all merge the same index.
    """
    out = Path(output_dir)
    if data is None or (isinstance(data, str) and not data.strip()):
        rank = get_rank()
        if rank != 0:
            _barrier()
        data = write_default_collection(out / "default_data", seed=seed)
        if rank == 0:
            _barrier()
    return prepare_slices(data, cache_dir or out / "slice_cache", workers=workers, progress=progress, **slicing)


def _memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def resolve_cache_rate(index: SliceIndex | Sequence[Mapping], cache_rate: float | str = "auto",
                       memory_share: float = 0.25, memory: int | None = None) -> float:
    """The ``cache_rate`` of the slice cache in memory: at most ``memory_share`` of the machine's memory
    (``memory`` bytes; default: all of it, from ``os.sysconf``), shared by the ranks on it (``LOCAL_WORLD_SIZE``).

    A cached slice takes ``H * W * 2`` bytes (float16) plus :data:`CACHED_SLICE_OVERHEAD`. ``"auto"`` caches as
    much as fits (1.0 for collections that fit); a number asking for more than fits raises a ValueError saying
    what fits. Entries without a ``shape`` (not from a :class:`SliceIndex`) are not checked.
    """
    auto = isinstance(cache_rate, str) and cache_rate.strip().lower() == "auto"
    rate = 1.0 if auto else float(cache_rate)
    if not 0.0 <= rate <= 1.0 or not 0.0 < float(memory_share) <= 1.0:
        raise ValueError(f"cache_rate must be 'auto' or in [0, 1] and cache_memory_share in (0, 1], got "
                         f"{cache_rate!r} and {memory_share!r}")
    if isinstance(index, SliceIndex):
        pixels = float(index.slice_pixels.sum())
    elif all("shape" in e for e in index):
        pixels = float(sum(math.prod(e["shape"]) for e in index))
    else:
        return rate
    need = 2 * pixels + CACHED_SLICE_OVERHEAD * len(index)
    total = memory or _memory_bytes()
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    budget = float(memory_share) * total / processes
    fits = min(1.0, math.floor(budget / max(need, 1.0) * 1000) / 1000)
    if auto:
        return fits
    if rate * need > budget:
        raise ValueError(f"cache_rate {rate} keeps {rate * need / 2**30:.1f} GiB of slices in memory per process, "
                         f"more than cache_memory_share {memory_share} of this machine's {total / 2**30:.1f} GiB "
                         f"shared by {processes} process(es) ({budget / 2**30:.1f} GiB each): set cache_rate auto "
                         f"(here {fits}), a value <= {fits}, or a larger cache_memory_share")
    return rate


def pretrain_dataset(
    index: SliceIndex | Sequence[Mapping],
    image_size: int = 96,
    encoder_name: str = "lvmmed_resnet50",
    cache_rate: float | str = "auto",
    num_workers: int = 0,
    views: Mapping | None = None,
    local_crops: int = 0,
    local_size: int | None = None,
    cache_memory_share: float = 0.25,
) -> SeededViewsDataset:
    """Dataset of ``{image_s, image_t, coords_s, coords_t}`` for :class:`GlobalBatchSampler`'s ``(index, seed)``.

    Args:
        index: slice index from :func:`pretrain_index`.
        image_size: size of both views.
        encoder_name: picks the input normalisation (ImageNet or SAM statistics).
        cache_rate: share of slices kept in memory (float16, ``CacheDataset``; 0 reads each time through the
            memory map); ``"auto"``: as many as fit in ``cache_memory_share`` (:func:`resolve_cache_rate`).
        num_workers: threads that fill the cache.
        views: extra ``LVMMedViewsd`` arguments (crop scale, jitter, blur...).
        local_crops: multi-crop: small views per image (``image_l0`` ...), each matched against a global view
            by :class:`~lvmmed_monai.engines.LVMMedPretrainModel` (paper: multi-crop as VICRegL; 0 = off).
        local_size: their size; None = ``image_size * 96 / 224`` (96 px at 224 px, as VICRegL and DINO), >= 16.
        cache_memory_share: the share of the machine's memory the caches of its processes may take.
    """
    from lvmmed_monai.encoders import input_normalization

    rate = resolve_cache_rate(index, cache_rate, cache_memory_share)
    load = Compose([LoadSliced("image", dtype=np.float16), SelectItemsd(["image"])])
    items = index if isinstance(index, SliceIndex) else [dict(e) for e in index]
    base = CacheDataset(items, load, cache_rate=rate, num_workers=num_workers or None,
                        progress=False) if rate > 0 else Dataset(items, load)
    mean, std = input_normalization(encoder_name)
    views = dict(views or {})
    if local_crops:
        if int(local_crops) < 0 or "num_local_crops" in views:
            raise ValueError(f"local_crops must be >= 0 and not also given as views.num_local_crops, got "
                             f"local_crops={local_crops!r}, views={views}")
        views["num_local_crops"] = int(local_crops)
        views.setdefault("local_size", local_size or max(16, int(image_size) * 96 // 224))
    keys = ["image_s", "image_t", *(f"image_l{j}" for j in range(int(views.get("num_local_crops", 0))))]
    random_part = Compose([
        CastToTyped("image", dtype=np.float32),  # exact: the cache holds float16
        LVMMedViewsd("image", size=image_size, out_channels=3, **views),
        NormalizeIntensityd(keys, subtrahend=mean, divisor=std, channel_wise=True),
    ])
    return SeededViewsDataset(base, random_part)
