"""Unlabeled pretraining collections: 2D images and 3D volumes -> normalised 2D slices (LVM-Med Sec. 4).

LVM-Med pretrains on 1.3M 2D images from 55 datasets, 3D volumes (CT, MRI) sliced to 2D. This module turns a
folder (or a list) mixing PNG/JPEG images, NIfTI/NRRD/MHA volumes and DICOM series into that form:

1. :func:`collect_files` finds the files (a folder holding ``.dcm`` files is one DICOM series) and gives each a
   modality (the ``modality`` key of a list entry, else the first sub-folder below the root, else the kind);
2. :func:`load_normalized` reads one file with MONAI's ``LoadImage`` (PIL, nibabel, ITK readers), checks it
   (unreadable, 4D, all-NaN, constant) and rescales it per volume: percentiles ``[p_lo, p_hi]`` -> ``[0, 1]``;
3. :func:`prepare_slices` slices every volume along ``axis``, drops blank slices and writes one float16
   ``(S, H, W)`` array per file to a cache folder (atomic, keyed by path, size, mtime and settings), so each
   volume is decoded once; the returned index has one entry per 2D slice;
4. :class:`LoadSliced` (a MONAI transform) reads a slice back through a memory map, ``(1, H, W)`` float32.

Bad files follow ``on_error``: ``"skip"`` logs a warning naming the file and the reason and goes on,
``"raise"`` stops with :class:`PretrainDataError`. An empty collection is always an error.
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
from monai.transforms import LoadImage, MapTransform

from lvmmed_monai.io import atomic_open

__all__ = [
    "PretrainDataError",
    "file_kind",
    "IMAGE_EXTENSIONS",
    "VOLUME_EXTENSIONS",
    "collect_files",
    "image_value_problem",
    "load_normalized",
    "prepare_slices",
    "LoadSliced",
    "modality_weights",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
VOLUME_EXTENSIONS = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")
_CACHE_VERSION = "1"


class PretrainDataError(ValueError):
    """A pretraining file or collection that cannot be used; the message names the file and the fix."""


def _ext(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def file_kind(path: Path) -> str | None:
    """``"image"``, ``"volume"`` (by extension) or ``"dicom"`` (a folder holding a DICOM series); None otherwise."""
    if path.is_dir():
        return "dicom" if any(p.is_file() and _is_dicom(p) for p in path.iterdir()) else None
    ext = _ext(path)
    return "image" if ext in IMAGE_EXTENSIONS else "volume" if ext in VOLUME_EXTENSIONS else None


def collect_files(data: str | os.PathLike | Sequence[str | os.PathLike | Mapping]) -> list[dict]:
    """Files of a collection: ``[{"path", "kind" ("image" | "volume" | "dicom"), "modality"}]``.

    ``data`` is a folder (searched recursively; a folder with ``.dcm`` files, or files with the DICOM magic,
    is one series), or a list of paths / ``{"image": path, "modality": name}`` entries. The modality of a
    folder's file is its first sub-folder below the root (``root/CT/a.nii.gz`` -> ``CT``), else its kind.
    """
    if isinstance(data, (str, os.PathLike)):
        root = Path(data)
        if not root.is_dir():
            raise PretrainDataError(f"pretraining data folder {root} does not exist; pass an existing folder, "
                                    "a list of files, or leave `data` empty for the built-in collection")
        found: list[dict] = []
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            if here != root and file_kind(here) == "dicom":
                dirnames.clear()
                found.append({"path": str(here), "kind": "dicom"})
                continue
            dirnames.sort()
            for name in sorted(filenames):
                kind = file_kind(here / name)
                if kind is not None:
                    found.append({"path": str(here / name), "kind": kind})
        for item in found:
            rel = Path(item["path"]).relative_to(root).parts
            item["modality"] = rel[0] if len(rel) > 1 else item["kind"]
        if not found:
            raise PretrainDataError(
                f"no image files found under {root}; supported: 2D {IMAGE_EXTENSIONS}, 3D {VOLUME_EXTENSIONS} "
                "and DICOM series (one folder of .dcm files per series)"
            )
        return found
    items = []
    for entry in data:
        info = dict(entry) if isinstance(entry, Mapping) else {"image": entry}
        if "image" not in info:
            raise PretrainDataError(f"list entries need an 'image' key, got {sorted(info)}")
        path = Path(info["image"])
        kind = file_kind(path) if path.exists() else ("image" if _ext(path) in IMAGE_EXTENSIONS else "volume")
        if kind is None:
            raise PretrainDataError(f"{path}: unsupported file type; supported: 2D {IMAGE_EXTENSIONS}, 3D "
                                    f"{VOLUME_EXTENSIONS} and DICOM series folders")
        items.append({"path": str(path), "kind": kind, "modality": str(info.get("modality", kind))})
    if not items:
        raise PretrainDataError("the list of pretraining files is empty; pass at least one image or volume")
    return items


def image_value_problem(image: np.ndarray | torch.Tensor, allow_some_nonfinite: bool = False) -> str | None:
    """Why an image's values make it unusable, or None: empty, no finite value (all NaN/Inf), some NaN/Inf values
    (unless ``allow_some_nonfinite``), or constant. The one check behind every workflow's refusal (pretraining
    slices, the bundles' :class:`~lvmmed_monai.data.segmentation.CheckedLoadImaged`); callers add the file and fix.
    """
    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.size == 0:
        return f"empty image (shape {tuple(arr.shape)})"
    if np.issubdtype(arr.dtype, np.inexact):
        finite = np.isfinite(arr)
        bad = arr.size - int(np.count_nonzero(finite))
        if bad == arr.size:
            return "no finite value (all NaN/Inf)"
        if bad and not allow_some_nonfinite:
            return f"{bad} of {arr.size} values are NaN/Inf"
        values = arr[finite] if bad else arr
    else:
        values = arr
    lo, hi = values.min(), values.max()
    if not hi > lo:
        return f"constant image (every value is {float(lo):g})"
    return None


def load_normalized(
    path: str | os.PathLike, kind: str, axis: int = 2, percentiles: tuple[float, float] = (0.5, 99.5)
) -> np.ndarray:
    """Read one file and return its slices ``(S, H, W)`` float32 in ``[0, 1]`` (one slice for 2D images).

    Intensities are rescaled per volume (all slices of a volume share one mapping, as a radiologist's window
    would): the ``percentiles`` of the finite voxels map to 0 and 1, values outside are clipped, NaN/Inf
    voxels become 0. RGB(A) images are averaged to grey (views replicate grey to the encoder's channels).

    Raises:
        PretrainDataError: unreadable file, 4D data, no finite voxel, or a constant image.
    """
    try:
        arr = np.asarray(LoadImage(image_only=True, dtype=np.float32)(str(path)), dtype=np.float32)
    except Exception as err:  # any reader failure: name the file, not the reader's internals
        raise PretrainDataError(f"{path}: unreadable ({type(err).__name__}: {str(err)[:160]}); remove or "
                                "re-export the file") from err
    if kind == "image" and arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = arr[..., :3].mean(-1)
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 3:
        if not -3 <= axis <= 2:
            raise PretrainDataError(f"slice axis must be 0, 1 or 2, got {axis}")
        arr = np.moveaxis(arr, axis, 0)
    else:
        raise PretrainDataError(f"{path}: {arr.ndim}D data of shape {arr.shape}; LVM-Med pretrains on 2D slices "
                                "of 3D volumes: split it into 3D volumes (one per time point or channel) first")
    problem = image_value_problem(arr, allow_some_nonfinite=True)
    if problem is not None:
        raise PretrainDataError(f"{path}: {problem}; it holds nothing to learn, remove the file")
    finite = np.isfinite(arr)
    values = arr[finite]
    lo, hi = np.percentile(values, percentiles)
    if not hi > lo:
        lo, hi = float(values.min()), float(values.max())
    out = np.clip((np.where(finite, arr, lo) - lo) / (hi - lo), 0.0, 1.0)
    return out.astype(np.float32)


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
