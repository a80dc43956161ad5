"""Generated detection phantoms: grey images with nodules (bright discs) and cysts (dark rings) and their boxes,
written as a COCO-style collection (the ``lvmmed_det`` bundle's built-in data)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from lvmmed_monai.io import write_folder_once

__all__ = ["DETECTION_CLASSES", "ANNOTATION_FILE", "detection_phantoms", "write_detection_phantoms"]

DETECTION_CLASSES = ("nodule", "cyst")
ANNOTATION_FILE = "annotations.json"  # a collection folder's COCO-style file (lvmmed_monai.data.detection reads it)
_PHANTOM_VERSION = 1


def detection_phantoms(n: int, size: int = 64, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """``n`` grey ``(size, size)`` images in [0, 1], each with 1-3 objects of :data:`DETECTION_CLASSES` (label 1:
    a bright filled ellipse, "nodule"; 2: a dark disc with a bright rim, "cyst") on a smooth textured background
    with noise, objects apart from each other; with their tight boxes ``(K, 4)`` ``[x, y, w, h]`` (pixel edges,
    x along columns) and labels ``(K,)``."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float64)
    images, boxes, labels = np.zeros((n, size, size), np.float32), [], []
    for i in range(n):
        fx, fy = rng.uniform(1, 4, 2) * 2 * np.pi / size
        image = 0.3 + 0.1 * (rng.uniform(-1, 1) * cols + rng.uniform(-1, 1) * rows) / size
        image += 0.05 * np.sin(fx * cols + rng.uniform(0, 6)) * np.cos(fy * rows + rng.uniform(0, 6))
        placed: list[tuple[float, float, float]] = []
        image_boxes, image_labels = [], []
        for _ in range(int(rng.integers(1, 4))):
            for _attempt in range(50):
                r = rng.uniform(0.08, 0.16) * size
                cx, cy = rng.uniform(r + 1, size - r - 1, 2)
                if all(math.hypot(cx - x, cy - y) > r + q + 2 for x, y, q in placed):
                    break
            else:
                continue  # no free room left for another object
            placed.append((cx, cy, r))
            aspect = rng.uniform(0.7, 1.0)
            dist = np.hypot((cols + 0.5 - cx) / r, (rows + 0.5 - cy) / (r * aspect))
            mask, label = dist <= 1, int(rng.integers(1, 3))
            if label == 1:
                image = np.where(mask, image + rng.uniform(0.35, 0.5), image)
            else:
                rim = mask & (dist > 0.65)
                image = np.where(mask, image - 0.2, image) + rim * rng.uniform(0.5, 0.6)
            ys, xs = np.nonzero(mask)
            image_boxes.append([xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1])
            image_labels.append(label)
        images[i] = np.clip(image + rng.normal(0, 0.03, image.shape), 0, 1)
        boxes.append(np.asarray(image_boxes, np.float32).reshape(-1, 4))
        labels.append(np.asarray(image_labels, np.int64))
    return images, boxes, labels


def write_detection_phantoms(root: str | os.PathLike, num_images: int = 32, size: int = 64, seed: int = 0) -> Path:
    """Write :func:`detection_phantoms` as ``root/images/phantom_NNN.png`` (grey, 0-255) and
    ``root/annotations.json`` (COCO-style, categories 1 nodule and 2 cyst), once; built in a temporary sibling
    folder and renamed."""
    if int(num_images) < 2 or int(size) < 32:
        raise ValueError(f"need num_images >= 2 and size >= 32, got {num_images}, {size}")
    from PIL import Image

    def fill(tmp: Path) -> None:
        images, boxes, labels = detection_phantoms(int(num_images), int(size), seed)
        (tmp / "images").mkdir()
        coco: dict[str, list] = {"images": [], "annotations": [],
                                 "categories": [{"id": i + 1, "name": n} for i, n in enumerate(DETECTION_CLASSES)]}
        for i, image in enumerate(images):
            name = f"images/phantom_{i:03d}.png"
            Image.fromarray((image * 255).round().astype(np.uint8)).save(tmp / name)
            coco["images"].append({"id": i + 1, "file_name": name, "width": int(size), "height": int(size)})
            for box, label in zip(boxes[i].tolist(), labels[i].tolist(), strict=True):
                coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": i + 1,
                                            "category_id": label, "bbox": box, "area": box[2] * box[3],
                                            "iscrowd": 0})
        (tmp / ANNOTATION_FILE).write_text(json.dumps(coco, indent=1))

    stamp = {"version": _PHANTOM_VERSION, "num_images": int(num_images), "size": int(size), "seed": seed}
    return write_folder_once(root, stamp, fill)
