"""Unlabeled pretraining collections: 2D images and 3D volumes -> normalised 2D slices (LVM-Med Sec. 4).

LVM-Med pretrains on 1.3M 2D images from 55 datasets, 3D volumes (CT, MRI) sliced to 2D. This module turns a
folder (or a list) mixing PNG/JPEG images, NIfTI/NRRD/MHA volumes and DICOM series into that form:

1. :func:`~lvmmed_monai.data.loading.collect_files` finds the files (a folder holding ``.dcm`` files is one DICOM
   series) and gives each a dataset (the ``modality`` key of a list entry, else the first sub-folder below the
   root, else the kind);
2. :func:`~lvmmed_monai.data.loading.load_normalized` reads one file with MONAI's ``LoadImage`` (PIL, nibabel,
   ITK readers), checks it (unreadable, 4D, all-NaN, constant) and rescales it per volume: percentiles
   ``[p_lo, p_hi]`` -> ``[0, 1]``;
3. :func:`prepare_slices` slices every volume along ``axis``, drops blank slices, bounds the size and writes the
   float16 slices into the sharded cache of :mod:`~lvmmed_monai.data.slice_cache`, in parallel: files are split
   across the ranks of a process group and across ``workers`` processes of a rank (each writes shards of its
   own), finished files are listed in the shards' manifests, so an interrupted preparation resumes and a rerun
   only stats the files; the result is a :class:`~lvmmed_monai.data.slice_cache.SliceIndex` (one entry per 2D
   slice, numpy arrays), the same for any number of workers or ranks. :func:`prepare_part` prepares one part of
   a collection (``lvmmed prepare-data --part``);
4. :class:`LoadSliced` (a MONAI transform) reads a slice back through a memory map, ``(1, H, W)``;
5. :func:`~lvmmed_monai.data.sampling.dataset_weights` gives per-slice sampling weights that mix the datasets.

Bad files follow ``on_error``: ``"skip"`` logs a warning naming the file and the reason and goes on (the reason is
kept in the cache: a rerun does not read the file again), ``"raise"`` stops with
:class:`~lvmmed_monai.data.loading.PretrainDataError`. An empty collection is always an error.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import time
from collections.abc import Hashable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from tqdm import tqdm

from lvmmed_monai.config_values import progress_enabled
from lvmmed_monai.data.loading import PretrainDataError, collect_files, load_normalized
from lvmmed_monai.data.slice_cache import (
    ShardWriter,
    SliceIndex,
    build_index,
    file_key,
    load_index,
    lookup,
    read_manifests,
    read_slice,
    save_index,
)
from lvmmed_monai.io import atomic_open
from lvmmed_monai.process_group import get_rank, get_world_size

__all__ = ["prepare_slices", "prepare_part", "default_workers", "LoadSliced"]

logger = logging.getLogger(__name__)

Data = str | os.PathLike | Sequence[str | os.PathLike | Mapping]


def default_workers() -> int:
    """Preparation processes per rank: the cores this process may use, shared by the ranks of its machine
    (``LOCAL_WORLD_SIZE``, set by torchrun)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def _options(axis: int, percentiles: Sequence[float], min_slice_range: float, max_size: int | None) -> dict:
    return {"axis": int(axis), "percentiles": tuple(float(p) for p in percentiles),
            "min_slice_range": float(min_slice_range), "max_size": int(max_size) if max_size else None}


def _bound_size(slices: np.ndarray, max_size: int | None) -> np.ndarray:
    """Downscale ``(S, H, W)`` so that ``max(H, W) <= max_size`` (area interpolation, aspect ratio kept)."""
    h, w = slices.shape[1:]
    if not max_size or max(h, w) <= max_size:
        return slices
    size = (max(1, round(h * max_size / max(h, w))), max(1, round(w * max_size / max(h, w))))
    out = torch.nn.functional.interpolate(torch.from_numpy(np.ascontiguousarray(slices))[:, None], size=size,
                                          mode="area")
    return out[:, 0].numpy()


def _slices_of(item: Mapping, axis: int, percentiles: tuple[float, float], min_slice_range: float,
               max_size: int | None) -> np.ndarray:
    """The kept slices of one file, ``(S, H, W)`` float16."""
    slices = load_normalized(item["path"], item["kind"], axis, percentiles)
    keep = (slices.max((1, 2)) - slices.min((1, 2))) >= min_slice_range
    if not keep.any():
        raise PretrainDataError(f"{item['path']}: every slice is blank (intensity range below "
                                f"min_slice_range={min_slice_range}); remove the file")
    return _bound_size(slices[keep], max_size).astype(np.float16)


def _prepare_files(files: Sequence[Mapping], keys: Sequence[str], folder: str, writer: str, options: dict,
                   on_error: str, shard_bytes: int) -> int:
    """One task: decode ``files`` into shards named ``writer-*``; what is finished is flushed even on an error."""
    out = ShardWriter(folder, writer, shard_bytes)
    try:
        for item, key in zip(files, keys, strict=True):
            try:
                out.add(key, _slices_of(item, **options))
            except (PretrainDataError, OSError) as err:
                if on_error == "raise":
                    raise err if isinstance(err, PretrainDataError) else PretrainDataError(str(err)) from err
                out.fail(key, str(err))
    finally:
        out.flush()
    return len(files)


def _worker_init() -> None:
    torch.set_num_threads(1)  # the processes share the cores


def _prepare(files: list[dict], keys: list[str], cache: Path, options: dict, on_error: str,
             part: tuple[int, int], workers: int | None, progress: bool | str, shard_mb: float) -> int:
    """Decode the files of part ``part = (r, n)`` (every n-th from the r-th) not finished yet; their number."""
    r, n = (int(v) for v in part)
    if not 0 <= r < n:
        raise ValueError(f"part must be (r, n) with 0 <= r < n, got {part}")
    known = read_manifests(cache)
    mine = np.arange(r, len(files), n)
    ids = np.array(keys, dtype="S20")[mine]
    todo = mine[(lookup(known["keys"], ids) < 0) & (lookup(known["failed_keys"], ids) < 0)].tolist()
    if not todo:
        return 0
    workers = max(1, min(int(workers or default_workers()), len(todo)))
    per_task = max(1, min(256, -(-len(todo) // (workers * 64))))  # ~64 tasks per worker: even ends
    writer = f"r{r}-{time.time_ns():x}-{os.getpid()}"
    tasks = [([files[i] for i in todo[s: s + per_task]], [keys[i] for i in todo[s: s + per_task]],
              str(cache / "shards"), f"{writer}-{s // per_task:06d}", options, on_error, int(shard_mb * 2**20))
             for s in range(0, len(todo), per_task)]
    desc = "preparing slices" + (f" (part {r}/{n})" if n > 1 else "")
    bar = tqdm(total=len(todo), unit=" files", desc=desc, disable=not progress_enabled(progress), smoothing=0.05)
    try:
        if workers == 1:
            for task in tasks:
                bar.update(_prepare_files(*task))
        else:
            fork = "fork" in multiprocessing.get_all_start_methods()  # no re-import of torch per worker
            pool = ProcessPoolExecutor(workers, multiprocessing.get_context("fork") if fork else None, _worker_init)
            try:
                for done in as_completed([pool.submit(_prepare_files, *task) for task in tasks]):
                    bar.update(done.result())
            finally:  # on an error: running tasks finish and flush, queued ones are dropped
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        bar.close()
    return len(todo)


def _collection(data: Data, axis: int, percentiles: Sequence[float], min_slice_range: float,
                max_size: int | None) -> tuple[list[dict], list[str], dict, str]:
    files = collect_files(data)
    options = _options(axis, percentiles, min_slice_range, max_size)
    settings = "|".join(f"{k}={v}" for k, v in options.items())
    keys = [file_key(f["path"], settings) for f in files]
    name = hashlib.sha1("\n".join([settings, *(f["path"] for f in files)]).encode()).hexdigest()[:16]
    return files, keys, options, name


def _wait_for_shares(cache: Path, name: str, keys: Sequence[str], rank: int, world: int, poll: float = 0.5) -> None:
    """Mark this rank's share of collection ``name`` finished and wait for the marks of the others, polling the
    cache folder rather than waiting in a collective that the process group's timeout would cut: a rank waits for
    the slowest share however long it takes. A mark holds a hash of its share's keys, so one left by an earlier
    run counts only for the same files and settings (prepared then)."""

    def mark(r: int) -> str:
        return hashlib.sha1("".join(keys[r::world]).encode()).hexdigest()

    def ready(r: int) -> bool:
        path = cache / "ready" / f"{name}-{r}-of-{world}"
        return path.is_file() and path.read_text() == mark(r)

    with atomic_open(cache / "ready" / f"{name}-{rank}-of-{world}", "w") as fh:
        fh.write(mark(rank))
    waiting, start, told = set(range(world)), time.monotonic(), time.monotonic()
    while waiting := {r for r in waiting if not ready(r)}:
        if time.monotonic() - told > 60:
            logger.info("rank %d: waiting %.0f s for the shares of rank(s) %s", rank, time.monotonic() - start,
                        sorted(waiting))
            told = time.monotonic()
        time.sleep(poll)


def prepare_part(data: Data, cache_dir: str | os.PathLike, part: tuple[int, int] = (0, 1), axis: int = 2,
                 percentiles: Sequence[float] = (0.5, 99.5), min_slice_range: float = 0.05, on_error: str = "skip",
                 max_size: int | None = 512, workers: int | None = 1, progress: bool | str = "auto",
                 shard_mb: float = 32) -> int:
    """Prepare part ``(r, n)`` of a collection (its files ``r, r + n, ...``) into ``cache_dir`` without merging an
    index (jobs on several machines, then one :func:`prepare_slices`); the number of files decoded."""
    _check_on_error(on_error)
    files, keys, options, _ = _collection(data, axis, percentiles, min_slice_range, max_size)
    return _prepare(files, keys, Path(cache_dir), options, on_error, part, workers, progress, shard_mb)


def _check_on_error(on_error: str) -> None:
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")


def _merge(cache: Path, files: list[dict], keys: list[str]) -> tuple[SliceIndex, list[tuple[str, str]]]:
    known = read_manifests(cache)
    ids = np.array(keys, dtype="S20")
    rows, bad = lookup(known["keys"], ids), lookup(known["failed_keys"], ids)
    missing = np.flatnonzero((rows < 0) & (bad < 0))
    if len(missing):
        raise PretrainDataError(f"{len(missing)} file(s) of the collection are not prepared (first: "
                                f"{files[missing[0]]['path']}): a rank or worker of the preparation stopped early; "
                                "run it again to finish (finished files are kept)")
    ok = np.flatnonzero(rows >= 0)
    failed = [(files[i]["path"], str(known["failed_messages"][bad[i]])) for i in np.flatnonzero(rows < 0)]
    index = build_index(cache, [files[i]["path"] for i in ok], [files[i]["modality"] for i in ok], known, rows[ok])
    return index, failed


def prepare_slices(
    data: Data,
    cache_dir: str | os.PathLike,
    axis: int = 2,
    percentiles: Sequence[float] = (0.5, 99.5),
    min_slice_range: float = 0.05,
    on_error: str = "skip",
    max_size: int | None = 512,
    workers: int | None = 1,
    progress: bool | str = "auto",
    shard_mb: float = 32,
) -> SliceIndex:
    """Slice and normalise a collection into the sharded cache ``cache_dir``; the index of its kept 2D slices.

    A slice whose intensity range is below ``min_slice_range`` (blank slices at a volume's ends) is dropped;
    slices larger than ``max_size`` (longer side) are downscaled (area averaging, aspect kept; None keeps the
    native size). Files already prepared with the same settings (path, size and mtime unchanged) are reused.
    In a process group, rank ``r`` of ``n`` decodes the files ``r, r + n, ...``, waits for the other ranks' shares
    (by marks in ``cache_dir``, not in a collective: no process-group timeout applies) and all merge the same
    index, in file order.

    Args:
        on_error: ``"skip"`` (log a warning naming the file and reason, go on) or ``"raise"``.
        workers: processes per rank (None: :func:`default_workers`); 1 decodes in this process.
        progress: tqdm bar (files/s, time left): ``"auto"`` on a terminal only, or a boolean.
        shard_mb: size of a shard file; a worker holds at most this much before writing.
    """
    _check_on_error(on_error)
    start = time.perf_counter()
    files, keys, options, name = _collection(data, axis, percentiles, min_slice_range, max_size)
    cache, rank, world = Path(cache_dir), get_rank(), get_world_size()
    path = cache / f"index-{name}.npz"
    loaded, decoded = load_index(path, keys), 0
    if loaded is None:
        decoded = _prepare(files, keys, cache, options, on_error, (rank, world), workers, progress, shard_mb)
        if world > 1:
            _wait_for_shares(cache, name, keys, rank, world)
        loaded = _merge(cache, files, keys)
        if rank == 0:
            save_index(path, loaded[0], keys, loaded[1])
    index, failed = loaded
    for source, message in failed:
        if on_error == "raise":
            raise PretrainDataError(message)
        if rank == 0:
            logger.warning("skipping %s: %s", source, message)
    if not len(index):
        raise PretrainDataError(f"no usable image in the collection ({len(failed)} file(s) skipped, see the "
                                "warnings above); fix or replace the files")
    if rank == 0:
        counts = np.bincount(index.dataset_ids, minlength=len(index.datasets)).tolist()
        per_dataset = dict(zip(index.datasets, counts, strict=True))
        logger.info("pretraining collection: %d slices from %d file(s) (%d skipped) in %s, %.1f s: %d file(s) decoded "
                    "by this process, the others reused or decoded by other ranks; per dataset %s; index %.1f bytes "
                    "per slice", len(index), len(files) - len(failed), len(failed), cache,
                    time.perf_counter() - start, decoded, per_dataset, index.nbytes / len(index))
    return index


class LoadSliced(MapTransform):
    """Read an index entry ``{key: shard .npy, "offset": o, "shape": (H, W)}`` -> ``{key: (1, H, W)}`` of ``dtype``
    (float32; float16 halves a cache of slices) through a memory map."""

    def __init__(self, keys: KeysCollection = "image", dtype: np.dtype | type = np.float32,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.dtype = np.dtype(dtype)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = read_slice(d[key], d["offset"], d["shape"]).astype(self.dtype)[None]
        return d
