"""Unlabeled pretraining collections: 2D images and 3D volumes -> normalised 2D slices (LVM-Med Sec. 4).

LVM-Med pretrains on 1.3M 2D images from 55 datasets, 3D volumes (CT, MRI) sliced to 2D. This module turns a
folder (or a list) mixing PNG/JPEG images, NIfTI/NRRD/MHA volumes and DICOM series into that form:

1. :func:`~lvmmed_monai.data.loading.collect_files` finds the files (a folder holding ``.dcm`` files is one DICOM
   series) and gives each a modality (the ``modality`` key of a list entry, else the first sub-folder below the
   root, else the kind);
2. :func:`~lvmmed_monai.data.loading.load_normalized` reads one file with MONAI's ``LoadImage`` (PIL, nibabel,
   ITK readers), checks it (unreadable, 4D, all-NaN, constant) and rescales it per volume: percentiles
   ``[p_lo, p_hi]`` -> ``[0, 1]``;
3. :func:`prepare_slices` slices every volume along ``axis``, drops blank slices and writes one float16
   ``(S, H, W)`` array per file to a cache folder (atomic, keyed by path, size, mtime and settings), so each
   volume is decoded once; the returned index has one entry per 2D slice;
4. :class:`LoadSliced` (a MONAI transform) reads a slice back through a memory map, ``(1, H, W)`` float32.

Bad files follow ``on_error``: ``"skip"`` logs a warning naming the file and the reason and goes on,
``"raise"`` stops with :class:`~lvmmed_monai.data.loading.PretrainDataError`. An empty collection is always an error.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from lvmmed_monai.data.loading import PretrainDataError, collect_files, load_normalized
from lvmmed_monai.io import atomic_open

__all__ = [
    "prepare_slices",
    "LoadSliced",
    "modality_weights",
]

logger = logging.getLogger(__name__)

_CACHE_VERSION = "1"


def _cache_key(item: Mapping, *settings: object) -> str:
    path = Path(item["path"]).resolve()
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.is_file()]
    text = f"{_CACHE_VERSION}|{path}|{stats}|{settings}"
    return hashlib.sha1(text.encode()).hexdigest()[:20]


def _bound_size(slices: np.ndarray, max_size: int | None) -> np.ndarray:
    """Downscale ``(S, H, W)`` so that ``max(H, W) <= max_size`` (area interpolation, aspect ratio kept)."""
    h, w = slices.shape[1:]
    if not max_size or max(h, w) <= max_size:
        return slices
    size = (max(1, round(h * max_size / max(h, w))), max(1, round(w * max_size / max(h, w))))
    out = torch.nn.functional.interpolate(torch.from_numpy(np.ascontiguousarray(slices))[:, None], size=size,
                                          mode="area")
    return out[:, 0].numpy()


def _save_npy_atomic(arr: np.ndarray, path: Path) -> None:
    with atomic_open(path) as fh:
        np.save(fh, arr)


def prepare_slices(
    data: str | os.PathLike | Sequence[str | os.PathLike | Mapping],
    cache_dir: str | os.PathLike,
    axis: int = 2,
    percentiles: tuple[float, float] = (0.5, 99.5),
    min_slice_range: float = 0.05,
    on_error: str = "skip",
    max_size: int | None = 512,
) -> list[dict]:
    """Slice and normalise a collection into ``cache_dir``; one index entry per kept 2D slice.

    Entries are ``{"image": cached .npy, "slice": i, "modality": m, "source": original path}``. A slice whose
    intensity range is below ``min_slice_range`` (blank slices at a volume's ends) is dropped; slices larger
    than ``max_size`` (longer side) are downscaled (area averaging, aspect kept; None keeps the native size).
    Cached arrays are reused while the file and the settings are unchanged.

    Args:
        on_error: ``"skip"`` (log a warning naming the file and reason, go on) or ``"raise"``.
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    index: list[dict] = []
    skipped: list[str] = []
    for item in collect_files(data):
        try:
            key = _cache_key(item, axis, list(percentiles), min_slice_range, max_size)
            target = cache / f"{key}.npy"
            if not target.is_file():
                slices = load_normalized(item["path"], item["kind"], axis, percentiles)
                keep = (slices.max((1, 2)) - slices.min((1, 2))) >= min_slice_range
                if not keep.any():
                    raise PretrainDataError(f"{item['path']}: every slice is blank (intensity range below "
                                            f"min_slice_range={min_slice_range}); remove the file")
                _save_npy_atomic(_bound_size(slices[keep], max_size).astype(np.float16), target)
            count = int(np.load(target, mmap_mode="r").shape[0])
        except (PretrainDataError, OSError) as err:
            if on_error == "raise":
                raise err if isinstance(err, PretrainDataError) else PretrainDataError(str(err)) from err
            logger.warning("skipping %s: %s", item["path"], err)
            skipped.append(item["path"])
            continue
        index += [{"image": str(target), "slice": i, "modality": item["modality"], "source": item["path"]}
                  for i in range(count)]
    if not index:
        raise PretrainDataError(f"no usable image in the collection ({len(skipped)} file(s) skipped, see the "
                                "warnings above); fix or replace the files")
    per_modality = dict(sorted(Counter(e["modality"] for e in index).items()))
    logger.info("pretraining collection: %d slices from %d file(s) (%d skipped); per modality %s",
                len(index), len({e["source"] for e in index}), len(skipped), per_modality)
    return index


def modality_weights(index: Sequence[Mapping]) -> list[float]:
    """Per-slice sampling weights ``1 / (slices of its modality)``: each modality is drawn equally often."""
    counts = Counter(e["modality"] for e in index)
    return [1.0 / counts[e["modality"]] for e in index]


class LoadSliced(MapTransform):
    """Read entry ``{key: cached .npy, slice_key: i}`` -> ``{key: (1, H, W) float32}`` through a memory map."""

    def __init__(self, keys: KeysCollection = "image", slice_key: str = "slice",
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.slice_key = slice_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            volume = np.load(str(d[key]), mmap_mode="r")
            d[key] = np.asarray(volume[int(d[self.slice_key])], dtype=np.float32)[None]
        return d
