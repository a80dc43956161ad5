"""3D datasets for the hybrid bundle: volume lists, image + label pairs, class folders, splits, a collate
that pads volumes of different depths (the ``lengths`` the hybrid networks take), and the checks of a loader
whose batches mix single slices of many volumes (:func:`slice_loader`, :func:`mixed_batch_volumes`).

A ``data`` argument is a folder, a single file, or a list (paths, or dicts with ``image`` and ``label``);
``None`` means the bundle's generated phantoms (:mod:`lvmmed_monai.demo.volumes`). Every problem the
files can have that would otherwise surface deep inside a transform (a label whose shape differs from its
image, an image without a label, an empty folder, an unknown class) raises :class:`VolumeDataError` first,
naming the files and the fix.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import list_data_collate
from monai.utils import convert_to_tensor

from lvmmed_monai.config_values import as_int
from lvmmed_monai.data.loading import IMAGE_EXTENSIONS, VOLUME_EXTENSIONS, VolumeDataError
from lvmmed_monai.demo.volumes import CLASSIFICATION_CLASSES, write_phantom_volumes

__all__ = ["VolumeDataError", "VOLUME_EXTENSIONS", "find_volumes", "volume_shape", "check_2d_or_3d",
           "volume_datalist", "segmentation_datalist", "classification_datalist", "split_train_val", "volume_data",
           "segmentation_data", "classification_data", "slice_first_indices", "PadDepthCollate", "check_2d",
           "is_empty", "SLICE_LOADERS", "slice_loader", "mixed_batch_volumes"]

Data = str | os.PathLike | Sequence[str | os.PathLike | Mapping[str, Any]] | None
_IMAGE_DIRS, _LABEL_DIRS = ("images", "imagesTr"), ("labels", "labelsTr")
# batches of runs of consecutive slices of whole volumes, or of single slices of many volumes
SLICE_LOADERS = ("volumes", "mixed")


def _is_volume(path: Path, extensions: tuple[str, ...] = VOLUME_EXTENSIONS) -> bool:
    return path.name.lower().endswith(extensions)


def file_stem(path: Path) -> str:
    """File name without the volume (or 2D image) extension."""
    name = path.name
    for ext in sorted(VOLUME_EXTENSIONS + IMAGE_EXTENSIONS, key=len, reverse=True):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def _without_channel(stem: str) -> str:
    """nnU-Net's image names end in a ``_0000`` channel suffix that its label names lack."""
    return stem[:-5] if len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit() else stem


def is_empty(data: Data) -> bool:
    """A data knob left unset: None, or "" / "null" / "none" as ``--key null`` reaches a bundle."""
    return data is None or (isinstance(data, str) and data.strip().lower() in ("", "null", "none"))


def find_volumes(folder: str | os.PathLike, extensions: tuple[str, ...] = VOLUME_EXTENSIONS) -> list[Path]:
    """Volume files (NIfTI, NRRD, MHA; or any of ``extensions``) under ``folder``, searched recursively, sorted."""
    root = Path(folder)
    if not root.is_dir():
        raise VolumeDataError(f"data folder {root} does not exist; pass an existing folder or a list of files")
    return sorted(p for p in root.rglob("*") if p.is_file() and _is_volume(p, extensions))


def volume_shape(path: str | os.PathLike) -> tuple[int, ...]:
    """Array shape of a volume file from its header (trailing singleton axes dropped), without reading voxels."""
    path = Path(path)
    if not path.is_file():
        raise VolumeDataError(f"{path}: no such file")
    try:
        if path.name.lower().endswith((".nii", ".nii.gz")):
            import nibabel as nib

            shape = tuple(int(s) for s in nib.load(str(path)).shape)
        else:
            import SimpleITK as sitk

            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            shape = tuple(int(s) for s in reader.GetSize())
    except Exception as err:  # any reader failure: name the file, not the reader's internals
        bands = _image_bands(path)
        if bands == 2:  # SimpleITK has no 2-component pixel type: the file is fine, its channels are not
            raise VolumeDataError(f"{path}: a 2-channel image (grey + alpha); expected grey or RGB: drop the alpha "
                                  "channel, e.g. PIL.Image.open(path).convert('L').save(path)") from err
        raise VolumeDataError(f"{path}: unreadable ({type(err).__name__}: {str(err)[:160]})") from err
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _image_bands(path: Path) -> int | None:
    """Channels of a 2D image file as PIL reads them (its header only), or None when PIL cannot open it."""
    if not path.name.lower().endswith(IMAGE_EXTENSIONS):
        return None
    try:
        from PIL import Image

        with Image.open(path) as image:
            return len(image.getbands())
    except Exception:
        return None


def _check_3d(path: str | os.PathLike) -> tuple[int, ...]:
    shape = volume_shape(path)
    if len(shape) != 3:
        raise VolumeDataError(f"{path}: array of shape {list(shape)}; the hybrid networks take single-channel 3D "
                              "volumes: split multi-channel or 4D files into 3D volumes first")
    return shape


def volume_datalist(data: str | os.PathLike | Sequence[str | os.PathLike | Mapping[str, Any]]) -> list[dict]:
    """``[{"image": path}]`` for a folder (recursive), one file, or a list of paths / ``{"image": ...}`` dicts;
    every file is checked to be a readable single-channel 3D volume."""
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        paths = [path] if path.is_file() else find_volumes(path)
        if not paths:
            raise VolumeDataError(f"no volume files under {path}; supported: {list(VOLUME_EXTENSIONS)}")
    else:
        paths = [Path(e["image"] if isinstance(e, Mapping) else e) for e in data]
        if not paths:
            raise VolumeDataError("the list of volumes is empty; pass at least one file")
    for p in paths:
        _check_3d(p)
    return [{"image": str(p)} for p in paths]


def _pairs_from_folder(root: Path, extensions: tuple[str, ...] = VOLUME_EXTENSIONS) -> list[dict]:
    image_dir = next((root / d for d in _IMAGE_DIRS if (root / d).is_dir()), None)
    label_dir = next((root / d for d in _LABEL_DIRS if (root / d).is_dir()), None)
    if image_dir is None or label_dir is None:
        raise VolumeDataError(f"{root} needs an images/ and a labels/ sub-folder (or nnU-Net's imagesTr/ and "
                              "labelsTr/) with files of the same names, or pass a list of {image, label} dicts")
    images, labels = find_volumes(image_dir, extensions), {file_stem(p): p for p in find_volumes(label_dir, extensions)}
    if not images:
        kind = "volume" if extensions == VOLUME_EXTENSIONS else "image"
        raise VolumeDataError(f"no {kind} files in {image_dir}; supported: {list(extensions)}")
    pairs = {p: labels.get(file_stem(p), labels.get(_without_channel(file_stem(p)))) for p in images}
    missing = [p.name for p, label in pairs.items() if label is None]
    if missing:
        raise VolumeDataError(f"{len(missing)} image(s) in {image_dir} have no label of the same name in "
                              f"{label_dir}: {missing[:5]}")
    return [{"image": str(p), "label": str(label)} for p, label in pairs.items()]


def check_2d_or_3d(path: str | os.PathLike) -> tuple[int, ...]:
    """The shape of a single-channel 2D image or 3D volume (from its header); others raise."""
    shape = volume_shape(path)
    if len(shape) not in (2, 3):
        raise VolumeDataError(f"{path}: array of shape {list(shape)}; expected a single-channel 2D image or 3D "
                              "volume: split multi-channel or 4D files first")
    return shape


def segmentation_datalist(data: str | os.PathLike | Sequence[Mapping[str, Any]],
                          allow_2d: bool = False) -> list[dict]:
    """``[{"image", "label"}]`` from a folder (``images/`` + ``labels/``, or ``imagesTr/`` + ``labelsTr/``,
    matched by file name) or a list of ``{"image": path, "label": path}``; each label must have its image's
    shape (checked from the headers). ``allow_2d``: 2D images (PNG, JPEG, ... or 2D NIfTI) as well as volumes,
    each label with its image's spatial shape (RGB images: their pixel grid)."""
    extensions = VOLUME_EXTENSIONS + IMAGE_EXTENSIONS if allow_2d else VOLUME_EXTENSIONS
    check = check_2d_or_3d if allow_2d else _check_3d
    if isinstance(data, (str, os.PathLike)):
        pairs = _pairs_from_folder(Path(data), extensions)
    else:
        pairs = [dict(e) for e in data]
        bad = [e for e in pairs if not {"image", "label"} <= set(e)]
        if not pairs or bad:
            raise VolumeDataError("segmentation data as a list needs {image: path, label: path} entries, got "
                                  f"{bad[:2] if bad else 'an empty list'}")
    for pair in pairs:
        image, label = check(pair["image"]), check(pair["label"])
        if image != label:
            raise VolumeDataError(f"label {pair['label']} has shape {list(label)} but its image {pair['image']} has "
                                  f"{list(image)}; every label must cover its image voxel for voxel (resample it)")
    return [{"image": str(e["image"]), "label": str(e["label"])} for e in pairs]


def check_2d(path: str | os.PathLike) -> tuple[int, ...]:
    shape = volume_shape(path)
    if len(shape) != 2:
        raise VolumeDataError(f"{path}: array of shape {list(shape)}; expected a 2D image (PNG, JPEG, 2D NIfTI): "
                              "classify 3D volumes with the lvmmed_hybrid3d bundle, or save single 2D slices")
    return shape


def classification_datalist(data: str | os.PathLike | Sequence[Mapping[str, Any]],
                            class_names: Sequence[str] | None = None,
                            spatial_dims: int = 3) -> tuple[list[dict], list[str]]:
    """``([{"image", "label": int}], class_names)`` from a folder with one sub-folder of files per class
    (searched recursively; classes sorted by name unless ``class_names`` gives the order) or a list of
    ``{"image", "label"}`` with integer labels or class names; at least 2 classes. ``spatial_dims``: 3 =
    single-channel volumes (NIfTI, NRRD, MHA), 2 = 2D images (PNG, JPEG, ..., 2D NIfTI; RGB allowed); every
    file is checked from its header (unreadable, wrong dimensionality)."""
    if int(spatial_dims) not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    extensions = VOLUME_EXTENSIONS if int(spatial_dims) == 3 else IMAGE_EXTENSIONS + VOLUME_EXTENSIONS
    check, kind = (_check_3d, "volumes") if int(spatial_dims) == 3 else (check_2d, "images")
    if isinstance(data, (str, os.PathLike)):
        root = Path(data)
        if not root.is_dir():
            raise VolumeDataError(f"classification data folder {root} does not exist")
        found = sorted(d.name for d in root.iterdir() if d.is_dir() and find_volumes(d, extensions))
        names = list(class_names) if class_names else found
        unknown = sorted(set(found) - set(names))
        if len(names) < 2 or unknown:
            raise VolumeDataError(f"{root} needs one sub-folder of {kind} per class (at least 2), named as "
                                  f"class_names={names}; found sub-folders with {kind}: {found} (supported files: "
                                  f"{list(extensions)})")
        entries: list[dict] = [{"image": str(p), "label": names.index(d)} for d in found
                               for p in find_volumes(root / d, extensions)]
    else:
        entries = [dict(e) for e in data]
        if not entries or any(not {"image", "label"} <= set(e) for e in entries):
            raise VolumeDataError("classification data as a list needs {image: path, label: class} entries")
        names = list(class_names) if class_names else sorted({str(e["label"]) for e in entries
                                                              if not isinstance(e["label"], int)})
        for e in entries:
            if not isinstance(e["label"], int):
                if str(e["label"]) not in names:
                    raise VolumeDataError(f"{e['image']}: unknown class {e['label']!r}; classes: {names}")
                e["label"] = names.index(str(e["label"]))
        if not names:
            names = [str(i) for i in range(max(e["label"] for e in entries) + 1)]
        if len(names) < 2:
            raise VolumeDataError(f"the list names a single class {names}; a classifier needs at least 2 classes "
                                  "(pass class_names to name classes absent from this list)")
    for e in entries:
        check(e["image"])
        if not 0 <= int(e["label"]) < len(names):
            raise VolumeDataError(f"{e['image']}: label {e['label']} outside 0..{len(names) - 1} ({names})")
    return [{"image": str(e["image"]), "label": int(e["label"])} for e in entries], names


def split_train_val(items: Sequence[dict], val_fraction: float = 0.25, seed: int = 0) -> dict[str, list[dict]]:
    """Random split ``{"train", "val"}`` (seeded), ``round(val_fraction * n)`` clamped to ``1..n-1`` for
    validation; with integer ``label`` entries, per class (every class in both parts where it has 2 items)."""
    if len(items) < 2:
        raise VolumeDataError(f"{len(items)} item(s): need at least 2 to split off a validation set (or pass "
                              "val_data)")
    if not 0 < float(val_fraction) < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    groups: dict[Hashable, list[dict]] = {}
    for item in items:
        groups.setdefault(item["label"] if isinstance(item.get("label"), int) else None, []).append(dict(item))
    train, val = [], []
    for group in groups.values():
        order = rng.permutation(len(group))
        n_val = int(np.clip(round(float(val_fraction) * len(group)), min(1, len(group) - 1), len(group) - 1))
        val += [group[i] for i in order[:n_val]]
        train += [group[i] for i in order[n_val:]]
    if not val:  # one item per class: move one to validation
        val.append(train.pop())
    return {"train": train, "val": val}


def volume_data(data: Data, default_dir: str | os.PathLike, task: str = "unlabeled", num_phantoms: int = 8,
                phantom_shape: Sequence[int] = (64, 64, 16), seed: int = 0) -> list[dict]:
    """``[{"image"}]`` volumes (pretraining, inference): ``data``, or the images of generated phantoms of
    ``task`` ("unlabeled" or "segmentation") in ``default_dir``."""
    if is_empty(data):
        if task not in ("unlabeled", "segmentation"):
            raise ValueError(f"task must be 'unlabeled' or 'segmentation', got {task!r}")
        data = write_phantom_volumes(default_dir, task, num_phantoms, phantom_shape, seed) / "images"
    return volume_datalist(data)


def segmentation_data(data: Data, default_dir: str | os.PathLike, val_data: Data = None,
                      val_fraction: float = 0.25, num_phantoms: int = 8,
                      phantom_shape: Sequence[int] = (64, 64, 16), seed: int = 0) -> dict[str, list[dict]]:
    """``{"train", "val"}`` image + label pairs: ``data`` (split by ``val_fraction`` unless ``val_data`` is
    given), or generated labeled phantoms in ``default_dir``."""
    if is_empty(data):
        data = write_phantom_volumes(default_dir, "segmentation", num_phantoms, phantom_shape, seed)
    items = segmentation_datalist(data)
    if not is_empty(val_data):
        return {"train": items, "val": segmentation_datalist(val_data)}
    return split_train_val(items, val_fraction, seed)


def classification_data(data: Data, default_dir: str | os.PathLike, val_data: Data = None,
                        val_fraction: float = 0.25, class_names: Sequence[str] | None = None,
                        num_classes: int | None = None, num_phantoms: int = 8,
                        phantom_shape: Sequence[int] = (64, 64, 16), seed: int = 0,
                        spatial_dims: int = 3) -> dict[str, Any]:
    """``{"train", "val", "classes"}`` for classification of volumes (``spatial_dims`` 3) or 2D images (2):
    ``data`` or, for volumes, generated phantoms (normal / nodule) in ``default_dir`` (2D phantoms:
    :func:`lvmmed_monai.data.classification.image_classification_data`); with ``num_classes``, checks that the
    data has that many classes; the training items must hold at least 2 of them."""
    if is_empty(data):
        if int(spatial_dims) != 3:
            raise VolumeDataError("no 2D classification data given: pass a folder with one sub-folder of images per "
                                  "class, or a list of {image, label}")
        data = write_phantom_volumes(default_dir, "classification", num_phantoms, phantom_shape, seed)
        class_names = class_names or CLASSIFICATION_CLASSES
    items, names = classification_datalist(data, class_names or None, spatial_dims)
    if num_classes is not None and int(num_classes) != len(names):
        raise VolumeDataError(f"num_classes={num_classes} but the data has {len(names)} classes {names}; set "
                              f"--num_classes {len(names)}")
    present = sorted({e["label"] for e in items})
    if len(present) < 2:
        raise VolumeDataError(f"the training data holds only class {names[present[0]]!r} of {names}; a classifier "
                              "needs examples of at least 2 classes")
    if not is_empty(val_data):
        val, _ = classification_datalist(val_data, names, spatial_dims)
        split = {"train": items, "val": val}
    else:
        split = split_train_val(items, val_fraction, seed)
    return {**split, "classes": names}


def slice_first_indices(slice_axis: int) -> list[int]:
    """``Transposed`` indices moving array axis ``slice_axis`` (0-2 of a channel-first ``(C, X, Y, Z)``
    volume) to the first spatial axis: the hybrid networks take ``(C, D, H, W)`` with D the slice axis."""
    if int(slice_axis) not in (0, 1, 2):
        raise ValueError(f"slice_axis must be 0, 1 or 2, got {slice_axis}")
    axis = int(slice_axis) + 1
    return [0, axis, *(i for i in (1, 2, 3) if i != axis)]


def slice_loader(name: str, knob: str = "stage1_loader") -> str:
    """A loader name of :data:`SLICE_LOADERS` (case-insensitive): ``volumes`` (each batch item a random run of
    consecutive slices of one volume) or ``mixed`` (each batch item one slice; a batch holds
    ``volumes_per_batch`` volumes x ``slices_per_volume`` slices, see :func:`mixed_batch_volumes`)."""
    text = str(name).strip().lower()
    if text not in SLICE_LOADERS:
        raise ValueError(f"{knob} must be one of {list(SLICE_LOADERS)}, got {name!r}")
    return text


def mixed_batch_volumes(volumes_per_batch: int | str, num_volumes: int) -> int:
    """``volumes_per_batch`` checked against the data's ``num_volumes``: the DataLoader batch size of the mixed
    slice loader.

    That loader is MONAI parts: ``RandSpatialCropSamplesd(roi_size=[1, -1, -1], num_samples=S)`` turns each
    volume into ``S`` depth-1 items (slices drawn independently, i.e. with replacement: ``S`` may exceed the
    depth, and a slice may come twice with its own two views), and a DataLoader of ``volumes_per_batch``
    volumes (shuffled without replacement, ``drop_last``) gives batches of exactly ``volumes_per_batch x S``
    slices of ``volumes_per_batch`` different volumes, flattened by :class:`PadDepthCollate`. Only the batch
    size needs checking: more volumes per batch than the data has would leave no full batch (a DataLoader
    runs an empty epoch without saying why).
    """
    count = as_int(volumes_per_batch, "volumes_per_batch")
    if count > num_volumes:
        raise VolumeDataError(f"volumes_per_batch={count} but the data has {num_volumes} volume(s): set "
                              f"--volumes_per_batch {num_volumes} or fewer, give more volumes, or use "
                              "--stage1_loader volumes")
    return count


class PadDepthCollate:
    """Collate ``(C, D_i, H, W)`` volumes of different depths: zero-pad ``keys`` at the end of the slice axis
    to the largest ``D`` and add ``lengths_key`` (``(B,)`` real depths), as the hybrid networks take them.

    The padded keys become plain tensors; everything else is collated by MONAI's ``list_data_collate``. A
    batch of lists (the samples of a transform such as ``RandSpatialCropSamplesd``) is flattened first, as
    ``list_data_collate`` does: ``B`` lists of ``S`` items give ``B * S`` volumes.
    """

    def __init__(self, keys: Sequence[str] = ("image",), lengths_key: str = "lengths") -> None:
        self.keys, self.lengths_key = tuple(keys), lengths_key

    def __call__(self, batch: Sequence[Mapping[str, Any] | Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
        items = [dict(b) for entry in batch for b in (entry if isinstance(entry, list) else [entry])]
        depths = []
        for item in items:
            vols = [convert_to_tensor(item[k], track_meta=False) for k in self.keys]
            if any(v.dim() != 4 for v in vols) or len({v.shape[1] for v in vols}) != 1:
                raise ValueError(f"{self.keys} must be (C, D, H, W) volumes of one depth, got "
                                 f"{[tuple(v.shape) for v in vols]}")
            depths.append(vols[0].shape[1])
            item.update(zip(self.keys, vols, strict=True))
        depth = max(depths)
        for item, d in zip(items, depths, strict=True):
            for k in self.keys:
                v = item[k]
                item[k] = torch.cat([v, v.new_zeros((v.shape[0], depth - d, *v.shape[2:]))], 1) if d < depth else v
        out = list_data_collate(items)
        out[self.lengths_key] = torch.tensor(depths)
        return out
