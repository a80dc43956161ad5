"""The pretraining data pipeline as the bundle builds it: collection -> slice index -> cached MONAI dataset
-> seeded LVM-Med views.

Deterministic work (reading a cached slice) is cached by MONAI's ``CacheDataset``; the
random views run per sample with the sample's seed (:class:`~lvmmed_monai.data.sampling.SeededViewsDataset`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import CacheDataset, Dataset
from monai.transforms import Compose, NormalizeIntensityd, SelectItemsd

from lvmmed_monai.data.pretrain import LoadSliced, prepare_slices
from lvmmed_monai.data.sampling import SeededViewsDataset
from lvmmed_monai.data.views import LVMMedViewsd
from lvmmed_monai.demo.phantoms import write_default_collection
from lvmmed_monai.process_group import get_rank

__all__ = ["pretrain_index", "pretrain_dataset"]


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def pretrain_index(
    data: str | os.PathLike | Sequence[str | os.PathLike | Mapping] | None,
    output_dir: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    **slicing: Any,
) -> list[dict]:
    """Slice index of ``data``: :func:`~lvmmed_monai.data.pretrain.prepare_slices` with its options ``slicing``
    (``axis``, ``percentiles``, ``min_slice_range``, ``on_error``, ``max_size``; their defaults there).

    ``data`` None or ``""`` uses the built-in generated collection, written once to
    ``output_dir/default_data`` (``seed``). Slices are cached in ``cache_dir`` (default
    ``output_dir/slice_cache``). In a process group, rank 0 prepares first and the others then read its cache.
    """
    out = Path(output_dir)
    rank = get_rank()
    if rank != 0:
        _barrier()
    if data is None or (isinstance(data, str) and not data.strip()):
        data = write_default_collection(out / "default_data", seed=seed)
    index = prepare_slices(data, cache_dir or out / "slice_cache", **slicing)
    if rank == 0:
        _barrier()
    return index


def pretrain_dataset(
    index: Sequence[Mapping],
    image_size: int = 96,
    encoder_name: str = "lvmmed_resnet50",
    cache_rate: float = 1.0,
    num_workers: int = 0,
    views: Mapping | None = None,
    local_crops: int = 0,
    local_size: int | None = None,
) -> SeededViewsDataset:
    """Dataset of ``{image_s, image_t, coords_s, coords_t}`` for :class:`GlobalBatchSampler`'s ``(index, seed)``.

    Args:
        index: slice index from :func:`pretrain_index`.
        image_size: size of both views.
        encoder_name: picks the input normalisation (ImageNet or SAM statistics).
        cache_rate: share of slices kept in memory after loading (``CacheDataset``; 0 reads each time).
        num_workers: threads that fill the cache.
        views: extra ``LVMMedViewsd`` arguments (crop scale, jitter, blur...).
        local_crops: multi-crop: small views per image (``image_l0`` ...), each matched against a global view
            by :class:`~lvmmed_monai.engines.LVMMedPretrainModel` (paper: multi-crop as VICRegL; 0 = off).
        local_size: their size; None = ``image_size * 96 / 224`` (96 px at 224 px, as VICRegL and DINO), >= 16.
    """
    from lvmmed_monai.encoders import input_normalization

    load = [LoadSliced("image"), SelectItemsd(["image"])]
    items = [dict(e) for e in index]
    base = CacheDataset(items, Compose(load), cache_rate=cache_rate, num_workers=num_workers or None,
                        progress=False) if cache_rate > 0 else Dataset(items, Compose(load))
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
        LVMMedViewsd("image", size=image_size, out_channels=3, **views),
        NormalizeIntensityd(keys, subtrahend=mean, divisor=std, channel_wise=True),
    ])
    return SeededViewsDataset(base, random_part)
