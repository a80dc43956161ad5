"""Loading shared by every task: finding the files of a collection, reading and checking one image or volume,
MONAI load transforms that name the bad file, and one family of data errors.

* :func:`collect_files` finds the files of a folder or list (a folder holding ``.dcm`` files is one DICOM series)
  and gives each a kind and a modality; :func:`file_kind` tells a file's kind;
* :func:`load_normalized` reads one file with MONAI's ``LoadImage`` and rescales it per volume (pretraining);
* :func:`image_value_problem` says what is wrong with an image's values (NaN/Inf, constant), if anything;
* :class:`CheckedLoadImaged` / :class:`MatchChannelsd`: the supervised bundles' loading transforms;
* :class:`DataError`: the base of :class:`PretrainDataError` (a pretraining collection) and
  :class:`VolumeDataError` (labelled images and volumes); each message names the file and the fix.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import LoadImage, LoadImaged, MapTransform
from monai.utils import ensure_tuple

__all__ = ["DataError", "PretrainDataError", "VolumeDataError", "IMAGE_EXTENSIONS", "VOLUME_EXTENSIONS", "file_kind",
           "collect_files", "image_value_problem", "load_normalized", "CheckedLoadImaged", "MatchChannelsd"]

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """Data that cannot be used; the message names the file (or the collection) and the fix."""


class VolumeDataError(DataError):
    """A 3D data set that cannot be used; the message names the files and the fix."""


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
VOLUME_EXTENSIONS = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")


class PretrainDataError(DataError):
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
    slices, the bundles' :class:`~lvmmed_monai.data.loading.CheckedLoadImaged`); callers add the file and fix.
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


class CheckedLoadImaged(LoadImaged):
    """MONAI's ``LoadImaged``; a file that cannot be read (truncated, corrupt) raises :class:`VolumeDataError`
    naming it instead of the reader's bare error, and so does an image of ``check_values`` keys (default
    ``image``; not labels, where all-background is valid) that holds NaN/Inf values or is constant
    (:func:`~lvmmed_monai.data.loading.image_value_problem`): a network would output garbage for it silently."""

    def __init__(self, keys: KeysCollection, *args: Any, check_values: KeysCollection | None = "image",
                 **kwargs: Any) -> None:
        super().__init__(keys, *args, **kwargs)
        self.check_values = ensure_tuple(check_values) if check_values is not None else ()

    def __call__(self, data: Mapping[Hashable, Any], reader: Any = None) -> dict[Hashable, Any]:
        try:
            out = super().__call__(data, reader)
        except VolumeDataError:
            raise
        except Exception as err:
            files = [str(data[k]) for k in self.key_iterator(dict(data))]
            raise VolumeDataError(f"{', '.join(files)}: unreadable ({type(err).__name__}: {str(err)[:200]}); remove "
                                  "or re-export the file") from err
        for key in self.check_values:
            problem = image_value_problem(out[key]) if key in out else None
            if problem is not None:
                raise VolumeDataError(f"{data[key]}: {problem}; a network would predict from nothing. Remove it from "
                                      "the data, or repair its values (NaN/Inf voxels: numpy.nan_to_num)")
        return out


class MatchChannelsd(MapTransform):
    """Give channel-first images ``channels`` channels: RGB(A) -> grey (mean of R, G, B) for 1, grey -> repeated
    for more; anything else raises (``(C, ...)`` in, ``(channels, ...)`` out)."""

    def __init__(self, keys: KeysCollection, channels: int = 1, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.channels = int(channels)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            x, c = d[key], d[key].shape[0]
            if c == self.channels:
                continue
            if self.channels == 1 and c in (3, 4):
                d[key] = x[:3].mean(0, keepdim=True) if isinstance(x, torch.Tensor) else x[:3].mean(0, keepdims=True)
            elif c == 1:
                d[key] = x.repeat(self.channels, *[1] * (x.ndim - 1)) if isinstance(x, torch.Tensor) else \
                    np.repeat(x, self.channels, 0)
            else:
                raise ValueError(f"{key} has {c} channels; the network takes {self.channels} (set --in_channels)")
        return d
