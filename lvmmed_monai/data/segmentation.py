"""Data for the ``lvmmed_seg`` bundle: 2D images and 3D volumes with label maps, segmented slice by slice.

* :func:`labeled_data` / :func:`labeled_datalist`: image + label pairs (2D PNG/JPEG/NIfTI images and 3D
  NIfTI/NRRD/MHA volumes, mixed as you like) from a folder or a list, with every problem checked before a
  run starts: a label whose shape differs from its image's (from the headers), an unreadable file, an empty
  folder, and label values that are not classes ``0..num_classes-1`` (every label is read once);
  :func:`inference_datalist`: images, volumes and DICOM series (a folder of ``.dcm`` files) to segment.
  Problems raise :class:`~lvmmed_monai.data.loading.VolumeDataError` naming the files and the fix.
* :func:`write_phantom_images`: the generated 2D labeled phantoms (PNG); the 3D ones come from
  :func:`~lvmmed_monai.demo.volumes.write_phantom_volumes`.
* Transforms: :class:`CheckedLoadImaged` (MONAI's ``LoadImaged`` naming the file it could not read),
  :class:`MatchChannelsd` (grey <-> RGB to the network's channels), :class:`RandSliceSamplesd` (random 2D
  slices of 3D items, MONAI's ``RandSpatialCropSamplesd`` + ``SqueezeDimd``; 2D items pass through).
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.config import KeysCollection
from monai.transforms import LoadImage, MapTransform, Randomizable, RandSpatialCropSamplesd, SqueezeDimd

from lvmmed_monai.data.loading import (
    IMAGE_EXTENSIONS,
    PretrainDataError,
    VolumeDataError,
    collect_files,
    file_kind,
)
from lvmmed_monai.data.volumes import (
    Data,
    check_2d_or_3d,
    file_stem,
    is_empty,
    segmentation_datalist,
    split_train_val,
)
from lvmmed_monai.demo.synthetic import IMAGE_PHANTOM_CLASSES, write_phantom_images
from lvmmed_monai.demo.volumes import SEGMENTATION_CLASSES, write_phantom_volumes

__all__ = ["PHANTOM_CLASSES", "phantom_data", "check_labels",
           "labeled_datalist", "labeled_data", "inference_datalist", "input_stats", "RandSliceSamplesd"]

PHANTOM_CLASSES = {"volumes": SEGMENTATION_CLASSES, "images": IMAGE_PHANTOM_CLASSES}
_OUTPUT_EXTENSIONS = (".nii.gz", ".nii", ".png")


def _read(path: str | os.PathLike) -> np.ndarray:
    try:
        return np.asarray(LoadImage(image_only=True, dtype=None)(str(path)))
    except Exception as err:  # any reader failure: name the file, not the reader's internals
        raise VolumeDataError(f"{path}: unreadable ({type(err).__name__}: {str(err)[:160]}); remove or re-export "
                              "the file") from err


def check_labels(items: Sequence[Mapping[str, Any]], num_classes: int, key: str = "label") -> None:
    """Read every label map of ``items`` and check that its values are classes ``0..num_classes-1`` (integers;
    an RGB label image only when its channels are equal). Raises :class:`VolumeDataError` naming the file, the
    values found and the fix."""
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be >= 2 (background + at least one class), got {num_classes}")
    for item in items:
        path = item[key]
        arr = _read(path)
        if arr.ndim == 3 and arr.shape[-1] in (3, 4) and Path(path).name.lower().endswith(IMAGE_EXTENSIONS):
            if not (arr[..., :3] == arr[..., :1]).all():
                raise VolumeDataError(f"label {path} is a colour image; labels must be maps of class indices "
                                      "(one channel, 0 = background)")
            arr = arr[..., 0]
        if not np.issubdtype(arr.dtype, np.integer) and not (np.isfinite(arr).all() and (arr == np.round(arr)).all()):
            raise VolumeDataError(f"label {path} holds non-integer values; labels must be maps of class indices "
                                  f"0..{num_classes - 1}")
        if arr.size and (arr.min() < 0 or arr.max() >= int(num_classes)):
            values = np.unique(arr)
            unknown = [v.item() for v in values if not 0 <= v < int(num_classes)]
            raise VolumeDataError(f"label {path} holds values {unknown[:10]} outside the classes 0..{num_classes - 1}"
                                  f" (values found: {[v.item() for v in values[:20]]}); set --num_classes "
                                  f"{int(values.max()) + 1} if they are classes, or remap the labels")


def phantom_data(default_dir: str | os.PathLike, default_data: str = "volumes", num_phantoms: int = 8,
                 phantom_shape: Sequence[int] = (64, 64, 16), seed: int = 0) -> Path:
    """The folder (``images/`` + ``labels/``) of the generated phantoms in ``default_dir``, written once:
    ``default_data`` "volumes" (CT-like torso volumes of ``phantom_shape``, classes lung and bone) or "images"
    (PNGs of ``phantom_shape[0]`` pixels, classes organ and lesion); 3 classes each with the background."""
    if default_data == "volumes":
        return write_phantom_volumes(default_dir, "segmentation", num_phantoms, phantom_shape, seed)
    if default_data == "images":
        return write_phantom_images(default_dir, num_phantoms, int(phantom_shape[0]), seed)
    raise ValueError(f"default_data must be one of {sorted(PHANTOM_CLASSES)}, got {default_data!r}")


def labeled_datalist(data: Data, num_classes: int, default_dir: str | os.PathLike | None = None,
                     default_data: str = "volumes", num_phantoms: int = 8, phantom_shape: Sequence[int] = (64, 64, 16),
                     seed: int = 0) -> list[dict]:
    """``[{"image", "label"}]`` from a folder (``images/`` + ``labels/``, or ``imagesTr/`` + ``labelsTr/``,
    matched by file name) or a list of ``{"image", "label"}``; 2D images and 3D volumes, all checked (see the
    module docstring). No ``data``: the generated phantoms of :func:`phantom_data` in ``default_dir``."""
    if is_empty(data):
        if default_dir is None:
            raise VolumeDataError("no labeled data given: pass a folder with images/ and labels/ or a list of "
                                  "{image, label}")
        data = phantom_data(default_dir, default_data, num_phantoms, phantom_shape, seed)
    items = segmentation_datalist(data, allow_2d=True)
    check_labels(items, num_classes)
    return items


def labeled_data(data: Data, default_dir: str | os.PathLike, num_classes: int, val_data: Data = None,
                 val_fraction: float = 0.25, default_data: str = "volumes", num_phantoms: int = 8,
                 phantom_shape: Sequence[int] = (64, 64, 16), seed: int = 0) -> dict[str, list[dict]]:
    """``{"train", "val"}`` checked image + label pairs: ``data`` (split by ``val_fraction`` unless ``val_data``
    is given), or the generated phantoms of :func:`phantom_data` in ``default_dir``."""
    items = labeled_datalist(data, num_classes, default_dir, default_data, num_phantoms, phantom_shape, seed)
    if not is_empty(val_data):
        return {"train": items, "val": labeled_datalist(val_data, num_classes)}
    return split_train_val(items, val_fraction, seed)


def _spatial_dims(item: Mapping[str, str]) -> int:
    if item["kind"] == "dicom":
        import SimpleITK as sitk

        if not sitk.ImageSeriesReader.GetGDCMSeriesFileNames(item["path"]):
            raise VolumeDataError(f"{item['path']}: no readable DICOM series in the folder")
        return 3
    return len(check_2d_or_3d(item["path"]))


def inference_datalist(data: Data, default_dir: str | os.PathLike, output_ext: str = ".nii.gz",
                       default_data: str = "volumes", num_phantoms: int = 8,
                       phantom_shape: Sequence[int] = (64, 64, 16), seed: int = 0) -> list[dict]:
    """``[{"image": path}]`` to segment: a file, a folder (searched recursively: 2D images, volumes, and DICOM
    series, one folder of ``.dcm`` files each) or a list of paths; null = the generated phantoms of
    ``default_data`` (the images of the training config's default data). Checks before anything is written:
    every file readable from its header and a single-channel 2D image or 3D volume; ``output_ext`` one of
    .nii.gz, .nii, .png (PNG for 2D inputs only); no two inputs with the same output name."""
    if output_ext not in _OUTPUT_EXTENSIONS:
        raise ValueError(f"output_ext must be one of {list(_OUTPUT_EXTENSIONS)}, got {output_ext!r}")
    if is_empty(data):
        data = phantom_data(default_dir, default_data, num_phantoms, phantom_shape, seed) / "images"
    if isinstance(data, (str, os.PathLike)) and (Path(data).is_file() or file_kind(Path(data)) == "dicom"):
        data = [data]  # one image, volume or DICOM series
    elif isinstance(data, (str, os.PathLike)) and not Path(data).is_dir():
        raise VolumeDataError(f"{data}: no such file or folder")
    try:
        items = collect_files(data)
    except PretrainDataError as err:
        raise VolumeDataError(str(err)) from err
    dims = {item["path"]: _spatial_dims(item) for item in items}
    if output_ext == ".png" and any(d != 2 for d in dims.values()):
        raise VolumeDataError(f"output_ext .png writes 2D label maps, but {[p for p, d in dims.items() if d != 2][:3]}"
                              " are volumes; use --output_ext .nii.gz")
    names: dict[str, str] = {}
    for path in dims:
        name = file_stem(Path(path))
        if name in names:
            raise VolumeDataError(f"{names[name]} and {path} would both be written as {name}_*{output_ext}; "
                                  "segment them in separate runs (or rename one)")
        names[name] = path
    return [{"image": path} for path in dims]


def input_stats(encoder_name: str, in_channels: int) -> tuple[list[float], list[float]]:
    """Per-channel ``(mean, std)`` for inputs in ``[0, 1]`` (``NormalizeIntensityd(channel_wise=True)``): the
    encoder's RGB statistics for 3 channels, their averages for every channel otherwise (grey images)."""
    from lvmmed_monai.encoders import input_normalization

    mean, std = input_normalization(encoder_name)
    if int(in_channels) == 3:
        return list(mean), list(std)
    return [sum(mean) / 3] * int(in_channels), [sum(std) / 3] * int(in_channels)


class RandSliceSamplesd(Randomizable, MapTransform):
    """``num_samples`` random 2D slices along ``slice_axis`` of channel-first 3D items ``(C, X, Y, Z)``, the
    same slices for all ``keys``: a list of ``(C, H, W)`` items (MONAI's ``RandSpatialCropSamplesd`` with a
    one-slice ROI, then ``SqueezeDimd``); 2D items ``(C, H, W)`` come back as a one-item list unchanged."""

    def __init__(self, keys: KeysCollection, slice_axis: int = 2, num_samples: int = 4,
                 allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if int(slice_axis) not in (0, 1, 2):
            raise ValueError(f"slice_axis must be 0, 1 or 2, got {slice_axis}")
        roi = [-1, -1, -1]
        roi[int(slice_axis)] = 1
        self.cropper = RandSpatialCropSamplesd(keys, roi_size=roi, num_samples=int(num_samples), random_size=False,
                                               allow_missing_keys=allow_missing_keys)
        self.squeeze = SqueezeDimd(keys, dim=int(slice_axis) + 1, update_meta=False,
                                   allow_missing_keys=allow_missing_keys)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None
                         ) -> RandSliceSamplesd:
        super().set_random_state(seed, state)
        self.cropper.set_random_state(seed, state)
        return self

    def randomize(self, data: Any = None) -> None:
        pass  # the cropper draws the slices

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict[Hashable, Any]]:
        d = dict(data)
        ndims = {d[k].ndim - 1 for k in self.key_iterator(d)}
        if ndims == {2}:
            return [d]
        if ndims != {3}:
            raise ValueError(f"{list(self.keys)} must be channel-first 2D or 3D arrays of one kind, got "
                             f"{[tuple(d[k].shape) for k in self.key_iterator(d)]}")
        return [self.squeeze(s) for s in self.cropper(d)]
