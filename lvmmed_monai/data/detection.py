"""Data for the ``lvmmed_det`` bundle: 2D images with boxes in a COCO-style JSON, every problem checked before a
run starts.

* :func:`read_coco`: a COCO-style JSON (``images`` with ``id``, ``file_name``, ``width``, ``height``;
  ``annotations`` with ``image_id``, ``bbox`` ``[x, y, w, h]`` in pixels, ``category_id``; ``categories``) and
  its image folder -> ``[{"image", "image_id", "file_name", "width", "height", "boxes", "labels"}]`` with
  ``boxes`` ``(K, 4)`` float32 ``[x1, y1, x2, y2]`` and ``labels`` ``(K,)`` int64 in ``1..C`` (the categories
  sorted by id; 0 is torchvision's background). A missing or unreadable image, an image whose size differs
  from the JSON's, a box of zero area or reaching outside its image, an unknown category or image id, an empty
  list raise :class:`~lvmmed_monai.data.loading.VolumeDataError` naming the problem and the fix.
* :func:`detection_data` (training: ``{"train", "val", "categories"}``), :func:`detection_datalist`
  (evaluation, against the model's categories) and :func:`detection_inputs` (images to detect on).
* :func:`write_detection_phantoms`: the built-in data (nothing downloaded), bright nodules and rimmed cysts on
  a textured background, as PNGs + ``annotations.json``; :func:`detection_phantoms` makes them in memory.
* :func:`save_categories` / :func:`model_categories`: the categories a training run used
  (``<output_dir>/categories.json``), so that evaluation and inference give the same category ids back.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lvmmed_monai.data.loading import IMAGE_EXTENSIONS, PretrainDataError, VolumeDataError, collect_files
from lvmmed_monai.data.volumes import check_2d, is_empty, split_train_val
from lvmmed_monai.demo.detection import ANNOTATION_FILE, write_detection_phantoms
from lvmmed_monai.io import atomic_open, make_readable

__all__ = ["CATEGORIES_FILE", "read_coco", "detection_data", "detection_datalist", "detection_inputs",
           "save_categories", "model_categories"]

CATEGORIES_FILE = "categories.json"
_BOX_TOLERANCE = 1e-3  # pixels: float round-off of exported boxes at the image border
_MAX_LISTED = 5


def _annotation_path(data: str | os.PathLike) -> Path:
    path = Path(data)
    if path.is_dir():
        path = path / ANNOTATION_FILE
    if not path.is_file():
        raise VolumeDataError(f"{path}: no such file; pass a COCO-style JSON (images, annotations, categories) or "
                              f"a folder holding {ANNOTATION_FILE}")
    return path


def _load_json(path: Path) -> dict:
    try:
        coco = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise VolumeDataError(f"{path}: not valid JSON ({err}); pass a COCO-style annotation file") from err
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(coco, dict)
               or not isinstance(coco.get(k), list)]
    if missing:
        raise VolumeDataError(f"{path}: a COCO-style JSON needs the lists 'images', 'annotations' and "
                              f"'categories'; missing or not a list: {missing}")
    if not coco["images"]:
        raise VolumeDataError(f"{path}: the 'images' list is empty; list every image with id, file_name, width "
                              "and height")
    return coco


def _raise_all(problems: list[str], path: Path, fix: str) -> None:
    if problems:
        more = f" (and {len(problems) - _MAX_LISTED} more)" if len(problems) > _MAX_LISTED else ""
        raise VolumeDataError(f"{path}: {'; '.join(problems[:_MAX_LISTED])}{more}. {fix}")


def _categories(coco: dict, path: Path, model: Sequence[Mapping[str, Any]] | None) -> dict[Any, int]:
    """``{category id: label 1..C}``: the JSON's categories sorted by id, or the model's (by id, same names)."""
    found = {c.get("id"): str(c.get("name", c.get("id"))) for c in coco["categories"] if isinstance(c, dict)}
    if len(found) != len(coco["categories"]) or not all(isinstance(c, int) for c in found):
        raise VolumeDataError(f"{path}: 'categories' must be {{id, name}} entries with distinct integer ids")
    if model is None:
        if not found:
            raise VolumeDataError(f"{path}: the 'categories' list is empty; name the object classes there")
        return {cid: i + 1 for i, cid in enumerate(sorted(found))}
    ids = {c["id"]: i + 1 for i, c in enumerate(model)}
    names = {c["id"]: str(c["name"]) for c in model}
    wrong = [f"{cid} {name!r}" for cid, name in found.items() if names.get(cid) != name]
    if wrong:
        raise VolumeDataError(f"{path}: categories {wrong} are not the model's {[(c['id'], c['name']) for c in model]}"
                              "; give the categories the model's ids and names (train_dir/categories.json)")
    return ids


def _image_entries(coco: dict, path: Path, image_dir: Path, check_files: bool) -> dict[Any, dict]:
    entries: dict[Any, dict] = {}
    problems: list[str] = []
    for im in coco["images"]:
        keys = [k for k in ("id", "file_name", "width", "height") if not isinstance(im, dict) or k not in im]
        if keys or not all(isinstance(im[k], int) and im[k] > 0 for k in ("width", "height")):
            problems.append(f"image entry {im!r:.80} lacks {keys}" if keys else
                            f"image id {im['id']}: width and height must be positive integers")
            continue
        if im["id"] in entries:
            problems.append(f"image id {im['id']} is listed twice")
            continue
        entries[im["id"]] = {"image": str(image_dir / im["file_name"]), "image_id": im["id"],
                             "file_name": str(im["file_name"]), "width": int(im["width"]), "height": int(im["height"])}
    _raise_all(problems, path, "List each image once with id, file_name, width and height.")
    if check_files:
        for e in entries.values():
            if not Path(e["image"]).is_file():
                raise VolumeDataError(f"{e['image']}: no such file (image id {e['image_id']} of {path}); fix its "
                                      "file_name, or pass --image_dir, the folder file_name is relative to")
            width, height = check_2d(e["image"])  # the header, not the pixels (x along the first axis)
            if (width, height) != (e["width"], e["height"]):
                raise VolumeDataError(f"{e['image']}: {width} x {height} pixels (width x height) but {path} says "
                                      f"{e['width']} x {e['height']} for image id {e['image_id']}; fix width and "
                                      "height in the JSON, or re-export the image")
    return entries


def _box_problem(bbox: Any, width: int, height: int) -> str | None:
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(
            isinstance(v, (int, float)) and math.isfinite(v) for v in bbox):
        return "is not 4 finite numbers [x, y, w, h]"
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return "has zero area (w or h <= 0)"
    if x < -_BOX_TOLERANCE or y < -_BOX_TOLERANCE or x + w > width + _BOX_TOLERANCE or \
            y + h > height + _BOX_TOLERANCE:
        return f"reaches outside its {width} x {height} image (x + w = {x + w:g}, y + h = {y + h:g})"
    return None


def read_coco(data: str | os.PathLike, image_dir: str | os.PathLike | None = None,
              categories: Sequence[Mapping[str, Any]] | None = None, require_boxes: bool = True,
              check_files: bool = True) -> tuple[list[dict], list[dict]]:
    """``(items, categories)`` of a COCO-style JSON (a file, or a folder holding ``annotations.json``): one item
    per image (see the module docstring; ``file_name`` relative to ``image_dir``, default the JSON's folder) and
    ``[{"id", "name"}]`` in label order. ``categories``: the model's (evaluation), else the JSON's sorted by id.
    Crowd annotations (``iscrowd`` 1) are left out; images without boxes are kept (negatives), but
    ``require_boxes`` needs one box in all. Every image file is checked from its header (``check_files``)."""
    path = _annotation_path(data)
    coco = _load_json(path)
    labels_of = _categories(coco, path, categories)
    entries = _image_entries(coco, path, Path(image_dir) if image_dir is not None else path.parent, check_files)
    boxes: dict[Any, list] = {i: [] for i in entries}
    problems: list[str] = []
    for ann in coco["annotations"]:
        if not isinstance(ann, dict) or ann.get("iscrowd", 0):
            continue
        where = f"annotation {ann.get('id', '?')}"
        if ann.get("image_id") not in entries:
            problems.append(f"{where} has image_id {ann.get('image_id')!r}, not an id of 'images'")
        elif ann.get("category_id") not in labels_of:
            problems.append(f"{where} ({entries[ann['image_id']]['file_name']}) has category_id "
                            f"{ann.get('category_id')!r}, not among the categories {sorted(labels_of, key=str)}")
        elif problem := _box_problem(ann.get("bbox"), entries[ann["image_id"]]["width"],
                                     entries[ann["image_id"]]["height"]):
            problems.append(f"{where} ({entries[ann['image_id']]['file_name']}): bbox {ann.get('bbox')} {problem}")
        else:
            x, y, w, h = (float(v) for v in ann["bbox"])
            boxes[ann["image_id"]].append((x, y, x + w, y + h, labels_of[ann["category_id"]]))
    _raise_all(problems, path, "Fix or drop these annotations (bbox is [x, y, width, height] in pixels of the "
                               "image; category_id one of 'categories'; image_id one of 'images').")
    if require_boxes and not any(boxes.values()):
        raise VolumeDataError(f"{path}: no boxes (the 'annotations' list has no usable entry); a detector needs "
                              "annotated objects to train or be evaluated on")
    items = []
    for image_id, entry in entries.items():
        arr = np.asarray(boxes[image_id], np.float64).reshape(-1, 5)
        items.append({**entry, "boxes": arr[:, :4].astype(np.float32), "labels": arr[:, 4].astype(np.int64)})
    by_label = sorted(labels_of, key=labels_of.get)
    names = {c["id"]: str(c.get("name", c["id"])) for c in (categories or coco["categories"])}
    return items, [{"id": cid, "name": names[cid]} for cid in by_label]


def detection_data(data: str | os.PathLike | None, default_dir: str | os.PathLike, num_classes: int,
                   val_data: str | os.PathLike | None = None, val_fraction: float = 0.25,
                   image_dir: str | os.PathLike | None = None, val_image_dir: str | os.PathLike | None = None,
                   num_phantoms: int = 32, image_size: int = 64, seed: int = 0) -> dict[str, Any]:
    """``{"train", "val", "categories"}`` checked items: ``data`` (split by ``val_fraction`` unless
    ``val_data``, a JSON with the same categories, is given), or the phantoms of :func:`write_detection_phantoms`
    in ``default_dir``. ``num_classes`` counts the background: the data must have ``num_classes - 1``
    categories."""
    if is_empty(data):
        data, image_dir = write_detection_phantoms(default_dir, num_phantoms, image_size, seed), None
    items, categories = read_coco(data, None if is_empty(image_dir) else image_dir)
    if len(categories) + 1 != int(num_classes):
        raise VolumeDataError(f"num_classes={num_classes} but the data has {len(categories)} categories "
                              f"{[c['name'] for c in categories]}; set --num_classes {len(categories) + 1} (the "
                              "categories and the background)")
    if not is_empty(val_data):
        val, _ = read_coco(val_data, None if is_empty(val_image_dir) else val_image_dir, categories)
        return {"train": items, "val": val, "categories": categories}
    return {**split_train_val(items, val_fraction, seed), "categories": categories}


def detection_datalist(data: str | os.PathLike | None, categories: Sequence[Mapping[str, Any]],
                       default_dir: str | os.PathLike | None = None, image_dir: str | os.PathLike | None = None,
                       num_phantoms: int = 16, image_size: int = 64, seed: int = 1) -> list[dict]:
    """Checked items of a labeled set for the model's ``categories`` (the JSON's categories must be among them,
    same ids and names; some may be absent): ``data`` as in :func:`read_coco`, or generated phantoms in
    ``default_dir`` (``seed`` 1: not the training phantoms of seed 0)."""
    if is_empty(data):
        if default_dir is None:
            raise VolumeDataError("no labeled data given: pass a COCO-style JSON (or a folder holding "
                                  f"{ANNOTATION_FILE})")
        data, image_dir = write_detection_phantoms(default_dir, num_phantoms, image_size, seed), None
    items, _ = read_coco(data, None if is_empty(image_dir) else image_dir, categories)
    return items


def detection_inputs(data: str | os.PathLike | Sequence[str | os.PathLike] | None,
                     default_dir: str | os.PathLike | None = None, image_dir: str | os.PathLike | None = None,
                     num_phantoms: int = 16, image_size: int = 64, seed: int = 1) -> list[dict]:
    """``[{"image", "image_id", "file_name", "width", "height"}]`` to detect on: the images of a COCO-style JSON
    (its ids and file names; annotations are not needed), a folder (searched recursively: ids 1..N in the
    order of the file names relative to it), an image file or a list of paths; null = generated phantoms in
    ``default_dir``. Every image is checked from its header (readable, 2D) before anything runs."""
    if is_empty(data):
        if default_dir is None:
            raise VolumeDataError("no images given: pass a folder, an image, a list of images or a COCO-style JSON")
        data = write_detection_phantoms(default_dir, num_phantoms, image_size, seed) / ANNOTATION_FILE
        image_dir = None
    if isinstance(data, (str, os.PathLike)) and str(data).lower().endswith(".json"):
        items, _ = read_coco(data, None if is_empty(image_dir) else image_dir, require_boxes=False)
        return [{k: e[k] for k in ("image", "image_id", "file_name", "width", "height")} for e in items]
    root = Path(data) if isinstance(data, (str, os.PathLike)) else None
    if root is not None and root.is_file():
        data, root = [str(root)], root.parent
    elif root is not None and not root.is_dir():
        raise VolumeDataError(f"{root}: no such file or folder")
    try:
        files = [f for f in collect_files(data) if f["kind"] == "image" or f["path"].lower().endswith((".nii",
                                                                                                     ".nii.gz"))]
    except PretrainDataError as err:
        raise VolumeDataError(str(err)) from err
    if not files:
        raise VolumeDataError(f"no 2D images in {data}; supported: {list(IMAGE_EXTENSIONS)} and 2D NIfTI")
    if isinstance(data, (str, os.PathLike)):
        files.sort(key=lambda f: Path(f["path"]).relative_to(root).parts)
    items = []
    for i, f in enumerate(files):
        width, height = check_2d(f["path"])
        name = os.path.relpath(f["path"], root) if root is not None else f["path"]
        items.append({"image": f["path"], "image_id": i + 1, "file_name": name, "width": width, "height": height})
    return items


def save_categories(output_dir: str | os.PathLike, categories: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``<output_dir>/categories.json`` (the category of each label 1..C of the model), atomically."""
    path = Path(output_dir) / CATEGORIES_FILE
    with atomic_open(path, "w") as fh:
        json.dump({"categories": [{"id": c["id"], "name": str(c["name"])} for c in categories]}, fh, indent=2)
    make_readable(path)
    return path


def model_categories(class_names: Sequence[str] | None, train_dir: str | os.PathLike | None,
                     num_classes: int) -> list[dict]:
    """The model's categories ``[{"id", "name"}]`` (label ``i`` is entry ``i - 1``): ``class_names`` (ids 1..C)
    if given, else the ``categories.json`` of its training run in ``train_dir``, else ids and names 1..C; there
    must be ``num_classes - 1`` of them (``num_classes`` counts the background)."""
    if class_names:
        found, source = [{"id": i + 1, "name": str(n)} for i, n in enumerate(class_names)], "class_names"
    elif train_dir is not None and (Path(train_dir) / CATEGORIES_FILE).is_file():
        path = Path(train_dir) / CATEGORIES_FILE
        found, source = json.loads(path.read_text())["categories"], str(path)
    else:
        found, source = [{"id": i, "name": str(i)} for i in range(1, int(num_classes))], "num_classes"
    if len(found) + 1 != int(num_classes):
        raise VolumeDataError(f"{len(found)} categories {[c['name'] for c in found]} (from {source}) for "
                              f"num_classes={num_classes} (categories + background); set --num_classes "
                              f"{len(found) + 1}")
    return found
