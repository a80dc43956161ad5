"""Box prompts for SAM-style segmentation: boxes from label maps, MedSAM's training boxes, user boxes.

A box table is a float32 array ``(K, 6)`` with the columns of :data:`BOX_COLUMNS`: ``slice`` (index along the
slice axis; 0 for 2D images), ``label`` (the class the box asks for), then ``x0, y0, x1, y1`` in pixels of the
array as MONAI loads it, corners inclusive (MedSAM's convention): ``y`` runs along the first in-plane axis
and ``x`` along the second (SAM's rows and columns). MONAI's detection box utilities order boxes per spatial
axis for boxes of objects in one image; here every box also carries its slice and class, and SAM reads
``x`` first, so the table is ours.

* :func:`label_boxes`: the boxes of a 2D or 3D label map, per class and slice (``mode="class"``) or per
  connected component within a slice (``mode="component"``), vectorised over slices;
* :class:`RandBoxPromptd`: training pairs as MedSAM makes them: one object of the label map, its box moved
  outwards by up to ``jitter`` pixels per side, and its binary mask as the target;
* :class:`BoxesFromLabeld` (evaluation, or inference from label files) and :class:`BoxTabled` (inference from
  user-given boxes, checked against the image) write the table under ``boxes``;
* :func:`read_boxes_file`: a JSON of boxes per image, checked before a run starts;
  :func:`box_inference_datalist`: the inputs to segment, each with its boxes (a JSON, or label files).
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable
from monai.utils import convert_to_numpy
from scipy import ndimage

from lvmmed_monai.data.loading import VolumeDataError
from lvmmed_monai.data.segmentation import check_labels, inference_datalist, phantom_data
from lvmmed_monai.data.volumes import Data, check_2d_or_3d, is_empty

__all__ = ["BOX_COLUMNS", "BOX_MODES", "label_boxes", "jitter_box", "RandBoxPromptd", "BoxesFromLabeld",
           "BoxTabled", "read_boxes_file", "check_box_table", "box_inference_datalist"]

BOX_COLUMNS = ("slice", "label", "x0", "y0", "x1", "y1")
BOX_MODES = ("class", "component")


def _in_plane_last(label: np.ndarray, slice_axis: int | None) -> np.ndarray:
    """``(H, W, D)`` with the slices last; 2D ``(H, W)`` becomes ``(H, W, 1)``; a leading channel of 1 is dropped."""
    if label.ndim in (3, 4) and label.shape[0] == 1 and (label.ndim == 4 or slice_axis is None):
        label = label[0]
    if label.ndim == 2:
        return label[..., None]
    if label.ndim != 3 or slice_axis is None:
        raise ValueError(f"expected a 2D label map, or a 3D one with slice_axis, got shape {label.shape}")
    return np.moveaxis(label, int(slice_axis), -1)


def _class_boxes(mask: np.ndarray) -> np.ndarray:
    """``(D, 5)`` rows ``present, x0, y0, x1, y1`` of a boolean ``(H, W, D)`` mask's box in every slice."""
    rows, cols = mask.any(1), mask.any(0)  # (H, D), (W, D)
    h, w = mask.shape[:2]
    y0, y1 = rows.argmax(0), h - 1 - rows[::-1].argmax(0)
    x0, x1 = cols.argmax(0), w - 1 - cols[::-1].argmax(0)
    return np.stack([rows.any(0), x0, y0, x1, y1], axis=1)


def label_boxes(label: np.ndarray | torch.Tensor, mode: str = "class", slice_axis: int | None = None,
                classes: Sequence[int] | None = None) -> np.ndarray:
    """The box table (:data:`BOX_COLUMNS`) of a label map, sorted by slice, then class.

    ``label``: 2D ``(H, W)`` or 3D with ``slice_axis`` (a leading channel of 1 is allowed). ``mode="class"``:
    one box per class present in a slice, around all its pixels there; ``"component"``: one per connected
    component of a class within a slice (4-connectivity in the plane, never across slices). ``classes``:
    the labels to box (default: every non-zero value present).
    """
    if mode not in BOX_MODES:
        raise ValueError(f"box mode must be one of {BOX_MODES}, got {mode!r}")
    lab = _in_plane_last(convert_to_numpy(label), slice_axis)
    wanted = np.unique(lab) if classes is None else np.asarray(list(classes))
    rows: list[np.ndarray] = []
    for c in wanted[wanted > 0]:
        mask = lab == c
        if mode == "class":
            found = _class_boxes(mask)
            present = np.flatnonzero(found[:, 0])
            boxes = found[present, 1:]
        else:
            structure = np.zeros((3, 3, 3), bool)
            structure[:, :, 1] = ndimage.generate_binary_structure(2, 1)
            components, _ = ndimage.label(mask, structure=structure)
            objects = ndimage.find_objects(components)
            present = np.array([o[2].start for o in objects], dtype=np.int64)
            boxes = np.array([[o[1].start, o[0].start, o[1].stop - 1, o[0].stop - 1] for o in objects]).reshape(-1, 4)
        if len(present):
            rows.append(np.column_stack([present, np.full(len(present), c), boxes]))
    if not rows:
        return np.zeros((0, 6), np.float32)
    table = np.concatenate(rows).astype(np.float32)
    return table[np.lexsort((table[:, 1], table[:, 0]))]


def jitter_box(box: np.ndarray, jitter: int, shape: tuple[int, int], rng: np.random.RandomState) -> np.ndarray:
    """Move each side of ``[x0, y0, x1, y1]`` outwards by 0..``jitter`` pixels (MedSAM's ``bbox_shift``),
    clipped to the image ``shape = (H, W)``."""
    if jitter <= 0:
        return np.asarray(box, np.float32)
    shift = rng.randint(0, int(jitter) + 1, size=4) * np.array([-1, -1, 1, 1])
    out = np.asarray(box, np.float64) + shift
    h, w = shape
    return np.clip(out, 0, [w - 1, h - 1, w - 1, h - 1]).astype(np.float32)


class RandBoxPromptd(Randomizable, MapTransform):
    """MedSAM-style training prompt of a 2D item: one object, its (jittered) box, its binary mask.

    The object is a class drawn uniformly among those present in the label map (``mode="class"``), or a
    connected component of it (``mode="component"``, drawn uniformly within the class). The label under
    ``keys`` becomes the object's mask ``(1, H, W)`` (float) and ``box_key`` holds ``[x0, y0, x1, y1]``
    (float32 tensor, :func:`jitter_box`). A label map without foreground gets a random box and an empty
    mask, so the network also learns to answer "nothing here".
    """

    def __init__(self, keys: KeysCollection, box_key: str = "box", mode: str = "class", jitter: int = 5,
                 allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if mode not in BOX_MODES:
            raise ValueError(f"box mode must be one of {BOX_MODES}, got {mode!r}")
        if len(self.keys) != 1:
            raise ValueError(f"RandBoxPromptd takes one label key, got {list(self.keys)}")
        self.box_key, self.mode, self.jitter = box_key, mode, int(jitter)

    def randomize(self, data: Any = None) -> None:
        pass  # the draws depend on the label map: made in __call__ from self.R

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = convert_to_numpy(d[key])
            if label.ndim != 3 or label.shape[0] != 1:
                raise ValueError(f"RandBoxPromptd expects a 2D label (1, H, W) under '{key}', got {label.shape}; "
                                 "draw 2D slices of volumes first (RandSliceSamplesd)")
            lab = label[0]
            h, w = lab.shape
            classes = np.unique(lab)
            classes = classes[classes > 0]
            if len(classes):
                mask = lab == classes[self.R.randint(len(classes))]
                if self.mode == "component":
                    components, n = ndimage.label(mask)
                    mask = components == 1 + self.R.randint(n)
                box = jitter_box(label_boxes(mask.astype(np.uint8))[0, 2:], self.jitter, (h, w), self.R)
            else:
                mask = np.zeros_like(lab, bool)
                xs, ys = np.sort(self.R.randint(0, w, 2)), np.sort(self.R.randint(0, h, 2))
                box = np.array([xs[0], ys[0], xs[1], ys[1]], np.float32)
            d[key] = torch.as_tensor(mask[None], dtype=torch.float32)
            d[self.box_key] = torch.as_tensor(box)
        return d


class BoxesFromLabeld(MapTransform):
    """The box table of the label map under ``keys`` (channel-first 2D or 3D), written under ``boxes_key``."""

    def __init__(self, keys: KeysCollection, boxes_key: str = "boxes", mode: str = "class", slice_axis: int = 2,
                 allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if mode not in BOX_MODES:
            raise ValueError(f"box mode must be one of {BOX_MODES}, got {mode!r}")
        self.boxes_key, self.mode, self.slice_axis = boxes_key, mode, int(slice_axis)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = convert_to_numpy(d[key])
            axis = None if label.ndim == 3 else self.slice_axis
            d[self.boxes_key] = torch.as_tensor(label_boxes(label, self.mode, axis))
        return d


def check_box_table(table: np.ndarray, spatial_shape: Sequence[int], slice_axis: int, num_classes: int | None,
                    name: str) -> None:
    """Refuse boxes outside the image, with x1 < x0 or y1 < y0, on a missing slice, or of an unknown class."""
    shape = tuple(int(s) for s in spatial_shape)
    if len(shape) == 2:
        h, w, depth = shape[0], shape[1], 1
    else:
        plane = [s for i, s in enumerate(shape) if i != slice_axis]
        (h, w), depth = plane, shape[slice_axis]
    problems = []
    for i, (s, c, x0, y0, x1, y1) in enumerate(np.asarray(table, np.float64).reshape(-1, 6)):
        if not (0 <= s < depth and s == int(s)):
            problems.append(f"box {i}: slice {s:g} not in 0..{depth - 1}")
        if num_classes is not None and not (1 <= c < num_classes and c == int(c)):
            problems.append(f"box {i}: label {c:g} not a foreground class 1..{num_classes - 1}")
        if not (0 <= x0 <= x1 <= w - 1 and 0 <= y0 <= y1 <= h - 1):
            problems.append(f"box {i}: [{x0:g}, {y0:g}, {x1:g}, {y1:g}] not inside the {h} x {w} slice "
                            "with x0 <= x1, y0 <= y1 (x along the second in-plane axis, corners inclusive)")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems) - 5} more)" if len(problems) > 5 else "")
        raise VolumeDataError(f"{name}: {shown}.")


class BoxTabled(MapTransform):
    """User boxes (a list of ``{"box": [x0, y0, x1, y1], "label": c, "slice": k}``) under ``keys`` -> the box
    table, checked against the loaded ``image_key`` (channel-first) with :func:`check_box_table`."""

    def __init__(self, keys: KeysCollection, image_key: str = "image", slice_axis: int = 2,
                 num_classes: int | None = None, allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.image_key, self.slice_axis, self.num_classes = image_key, int(slice_axis), num_classes

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        spatial = tuple(d[self.image_key].shape[1:])
        name = str(getattr(d[self.image_key], "meta", {}).get("filename_or_obj", self.image_key))
        for key in self.key_iterator(d):
            entries = d[key]
            table = np.array([[e.get("slice", 0), e["label"], *e["box"]] for e in entries], np.float32).reshape(-1, 6)
            check_box_table(table, spatial, self.slice_axis, self.num_classes, name)
            d[key] = torch.as_tensor(table)
        return d


def read_boxes_file(path: str | os.PathLike, image_paths: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """Read a JSON ``{"<image file name>": [{"box": [x0, y0, x1, y1], "label": c, "slice": k}, ...]}``.

    Keys are matched to ``image_paths`` by file name (``case1.nii.gz``) or full path. Returns the boxes per
    image path. Every entry is checked for its fields here (ranges are checked once the image is loaded,
    :class:`BoxTabled`); an image without boxes, or boxes for an image not in the run, raise naming them.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"boxes file not found: {path}. Pass a JSON of boxes per image (docs/sam.md).")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise VolumeDataError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise VolumeDataError(f"{path}: expected an object mapping image file names to lists of boxes")
    by_name = {Path(p).name: p for p in image_paths}
    out: dict[str, list[dict[str, Any]]] = {}
    unknown = []
    for key, entries in raw.items():
        target = key if key in image_paths else by_name.get(Path(key).name)
        if target is None:
            unknown.append(key)
            continue
        if not isinstance(entries, list) or not entries:
            raise VolumeDataError(f"{path}: '{key}' must map to a non-empty list of boxes")
        for i, e in enumerate(entries):
            box = e.get("box") if isinstance(e, dict) else None
            if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)) \
                    or not isinstance(e.get("label"), int) or not isinstance(e.get("slice", 0), int):
                raise VolumeDataError(
                    f"{path}: '{key}' box {i} is {e!r}; each box is {{\"box\": [x0, y0, x1, y1], \"label\": class "
                    "(int >= 1), \"slice\": index along slice_axis (int, 3D only)}"
                )
        out[target] = entries
    if unknown:
        raise VolumeDataError(f"{path}: boxes for images not in the data: {unknown[:5]}; keys are the image file "
                              f"names (e.g. {list(by_name)[:3]})")
    missing = [p for p in image_paths if p not in out]
    if missing:
        raise VolumeDataError(f"{path}: no boxes for {len(missing)} image(s): {[Path(p).name for p in missing[:5]]}; "
                              "give each image at least one box, or leave it out of the data")
    return out


def box_inference_datalist(data: Data, default_dir: str | os.PathLike, num_classes: int,
                           boxes_file: str | os.PathLike | None = None, box_labels: str | os.PathLike | None = None,
                           output_ext: str = ".nii.gz", default_data: str = "volumes", num_phantoms: int = 8,
                           phantom_shape: Sequence[int] = (64, 64, 16), seed: int = 0) -> list[dict]:
    """The inputs of :func:`~lvmmed_monai.data.segmentation.inference_datalist`, each with its boxes.

    Boxes come from ``boxes_file`` (:func:`read_boxes_file`; item key ``boxes``) or from label maps
    (``box_labels``: a folder holding a label file of the same name as each input; item key ``box_label``,
    boxed per class and slice by :class:`BoxesFromLabeld`). Neither and no ``data``: the generated
    phantoms' own labels. Both, or neither with user data, is an error; so is a missing label file, one
    whose shape differs from its image's, or one with values outside ``0..num_classes-1``.
    """
    if boxes_file is not None and box_labels is not None:
        raise ValueError("give the boxes either as boxes_file (JSON) or as box_labels (label files), not both")
    if is_empty(data) and boxes_file is None and box_labels is None:
        box_labels = phantom_data(default_dir, default_data, num_phantoms, phantom_shape, seed) / "labels"
    elif boxes_file is None and box_labels is None:
        raise ValueError("box-prompted segmentation needs boxes: pass --boxes_file boxes.json (docs/sam.md) or "
                         "--box_labels FOLDER (label maps with the inputs' file names, boxed per class and slice)")
    items = inference_datalist(data, default_dir, output_ext, default_data, num_phantoms, phantom_shape, seed)
    if boxes_file is not None:
        boxes = read_boxes_file(boxes_file, [item["image"] for item in items])
        return [{**item, "boxes": boxes[item["image"]]} for item in items]
    folder = Path(box_labels)
    if not folder.is_dir():
        raise FileNotFoundError(f"box_labels folder not found: {folder}")
    out, missing = [], []
    for item in items:
        label = folder / Path(item["image"]).name
        if not label.is_file():
            missing.append(label.name)
            continue
        if tuple(check_2d_or_3d(str(label))) != tuple(check_2d_or_3d(item["image"])):
            raise VolumeDataError(f"box label {label} has shape {check_2d_or_3d(str(label))}, its image "
                                  f"{item['image']} {check_2d_or_3d(item['image'])}; they must match")
        out.append({**item, "box_label": str(label)})
    if missing:
        raise VolumeDataError(f"no label file in {folder} for {len(missing)} input(s): {missing[:5]}; label files "
                              "take their image's file name")
    check_labels(out, num_classes, key="box_label")
    return out
