"""Data for the ``lvmmed_cls`` bundle: labeled 2D images (one sub-folder per class, or a list) and images to
classify, every file checked before a run starts.

* :func:`image_classification_data` (training: ``{"train", "val", "classes"}``) and
  :func:`image_classification_datalist` (evaluation, against the model's classes) wrap
  :func:`~lvmmed_monai.data.volumes.classification_data` / ``classification_datalist`` with 2D images (PNG,
  JPEG, BMP, TIFF, 2D NIfTI): an empty folder, a single class, a 3D file, an unreadable file raise
  :class:`~lvmmed_monai.data.loading.VolumeDataError` naming the files and the fix.
* :func:`classification_inputs`: the images to classify (a file, a folder searched recursively, a list).
* :func:`write_shape_phantoms`: the built-in data, :func:`~lvmmed_monai.demo.phantoms.shape_phantoms` written as
  ``<class>/shape_NNN.png`` (nothing downloaded).
* :func:`save_class_names` / :func:`model_class_names`: the class names a training run used
  (``<output_dir>/classes.json``), for evaluation and inference with the same model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from lvmmed_monai.data.loading import PretrainDataError, VolumeDataError, collect_files
from lvmmed_monai.data.volumes import (
    Data,
    check_2d,
    classification_data,
    classification_datalist,
    is_empty,
)
from lvmmed_monai.demo.phantoms import SHAPE_CLASSES, write_shape_phantoms
from lvmmed_monai.io import atomic_open, make_readable

__all__ = ["image_classification_data", "image_classification_datalist",
           "classification_inputs", "save_class_names", "model_class_names"]

CLASSES_FILE = "classes.json"


def image_classification_data(data: Data, default_dir: str | os.PathLike, val_data: Data = None,
                              val_fraction: float = 0.25, class_names: Sequence[str] | None = None,
                              num_classes: int | None = None, num_phantoms: int = 96, image_size: int = 64,
                              seed: int = 0) -> dict:
    """``{"train", "val", "classes"}`` checked ``{"image", "label"}`` items of 2D images: ``data`` (a folder
    with one sub-folder per class, or a list of ``{image, label (index or class name)}``; split per class by
    ``val_fraction`` unless ``val_data`` is given), or the generated phantoms of :func:`write_shape_phantoms`
    in ``default_dir``; with ``num_classes``, checks that the data has that many classes."""
    if is_empty(data):
        data = write_shape_phantoms(default_dir, num_phantoms, image_size, seed)
        class_names = class_names or SHAPE_CLASSES
    return classification_data(data, default_dir, val_data, val_fraction, class_names or None, num_classes,
                               seed=seed, spatial_dims=2)


def image_classification_datalist(data: Data, class_names: Sequence[str], default_dir: str | os.PathLike | None = None,
                                  num_phantoms: int = 96, image_size: int = 64, seed: int = 1) -> list[dict]:
    """Checked ``[{"image", "label"}]`` 2D images of the model's ``class_names`` (a class sub-folder or a class
    name unknown to the model is an error; classes may be absent): ``data`` as in
    :func:`image_classification_data`, or generated phantoms in ``default_dir`` (``seed`` 1: not the
    training phantoms of seed 0)."""
    if is_empty(data):
        if default_dir is None:
            raise VolumeDataError("no labeled data given: pass a folder with one sub-folder of images per class, or a "
                                  "list of {image, label}")
        data = write_shape_phantoms(default_dir, num_phantoms, image_size, seed)
    items, _ = classification_datalist(data, list(class_names), spatial_dims=2)
    return items


def classification_inputs(data: Data, default_dir: str | os.PathLike | None = None, num_phantoms: int = 96,
                          image_size: int = 64, seed: int = 1) -> list[dict]:
    """``[{"image": path}]`` 2D images to classify: a file, a folder (searched recursively) or a list of paths
    (or ``{"image": path}``); null = the images of generated phantoms in ``default_dir``. Every file is checked
    from its header (readable, 2D) before anything runs."""
    if is_empty(data):
        if default_dir is None:
            raise VolumeDataError("no images given: pass a file, a folder or a list of 2D images")
        data = write_shape_phantoms(default_dir, num_phantoms, image_size, seed)
    if isinstance(data, (str, os.PathLike)):
        if Path(data).is_file():
            data = [data]
        elif not Path(data).is_dir():
            raise VolumeDataError(f"{data}: no such file or folder")
    try:
        items = collect_files(data)
    except PretrainDataError as err:
        raise VolumeDataError(str(err)) from err
    for item in items:
        if item["kind"] == "dicom":
            raise VolumeDataError(f"{item['path']}: a DICOM series (a volume); the classifier takes 2D images "
                                  "(PNG, JPEG, 2D NIfTI)")
        check_2d(item["path"])
    return [{"image": item["path"]} for item in items]


def save_class_names(output_dir: str | os.PathLike, class_names: Sequence[str]) -> Path:
    """Write ``<output_dir>/classes.json`` (the class of each output channel of the model), atomically."""
    path = Path(output_dir) / CLASSES_FILE
    with atomic_open(path, "w") as fh:
        json.dump({"classes": [str(c) for c in class_names]}, fh, indent=2)
    make_readable(path)
    return path


def model_class_names(class_names: Sequence[str] | None, train_dir: str | os.PathLike | None,
                      num_classes: int) -> list[str]:
    """The model's class names: ``class_names`` if given, else the ``classes.json`` of its training run in
    ``train_dir``, else ``["0", "1", ...]``; there must be ``num_classes`` of them."""
    if class_names:
        names, source = [str(c) for c in class_names], "class_names"
    elif train_dir is not None and (Path(train_dir) / CLASSES_FILE).is_file():
        path = Path(train_dir) / CLASSES_FILE
        names, source = [str(c) for c in json.loads(path.read_text())["classes"]], str(path)
    else:
        names, source = [str(i) for i in range(int(num_classes))], "num_classes"
    if len(names) != int(num_classes):
        raise VolumeDataError(f"{len(names)} class names {names} (from {source}) for num_classes={num_classes}; "
                              "set --num_classes to the model's number of classes")
    return names
