"""Generated CT-like volumes for the 3D bundles: unlabeled, with segmentation labels, or with a volume class.

Nothing is downloaded (DESIGN.md). The volumes are the torso phantoms of :mod:`lvmmed_monai.demo.phantoms`
(Hounsfield units, shapes drifting along z) written as NIfTI, so that the whole file pipeline of a bundle
(reader, affine, writer) runs on them:

* ``"unlabeled"``: ``root/images/torso_NN.nii.gz`` (joint 2D-3D pretraining);
* ``"segmentation"``: ``root/images/torso_NN.nii.gz`` and ``root/labels/torso_NN.nii.gz`` with the classes of
  :data:`SEGMENTATION_CLASSES` (read off the phantom's own tissue values, so the labels are exact);
* ``"classification"``: ``root/<class>/torso_NN.nii.gz`` for the classes of :data:`CLASSIFICATION_CLASSES`
  (a soft-tissue nodule inside a lung, or none), balanced.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lvmmed_monai.demo.phantoms import torso_ct
from lvmmed_monai.io import write_folder_once

__all__ = ["PHANTOM_TASKS", "SEGMENTATION_CLASSES", "CLASSIFICATION_CLASSES", "torso_labels", "add_nodule",
           "write_phantom_volumes"]

PHANTOM_TASKS = ("unlabeled", "segmentation", "classification")
SEGMENTATION_CLASSES = ("background", "lung", "bone")
CLASSIFICATION_CLASSES = ("normal", "nodule")
PHANTOM_AFFINE = np.array([[0.8, 0, 0, -40.0], [0, 0.8, 0, -40.0], [0, 0, 2.5, 0.0], [0, 0, 0, 1]])
_VERSION = 1


def torso_labels(volume: np.ndarray) -> np.ndarray:
    """Labels ``(X, Y, Z)`` uint8 of a torso phantom in HU: 1 = lung (-820 HU), 2 = bone (700 HU), else 0.

    The phantom's tissues have fixed values plus Gaussian noise of 15 HU, so the windows used here
    ((-900, -700) and above 450) are more than 5 noise deviations from every other tissue.
    """
    labels = np.zeros(volume.shape, np.uint8)
    labels[(volume > -900) & (volume < -700)] = 1
    labels[volume > 450] = 2
    return labels


def add_nodule(volume: np.ndarray, rng: np.random.Generator, radius: float = 0.15) -> np.ndarray:
    """A soft-tissue nodule (40 HU) inside a lung of ``volume (X, Y, Z)``: a ball of ``radius`` times the
    in-plane size (at least 1.5 voxels; along z at least one slice each side) around a random lung voxel."""
    lung = np.argwhere(torso_labels(volume) == 1)
    if len(lung) == 0:
        raise ValueError("the phantom has no lung voxel to place a nodule in (volume too small?)")
    centre = lung[rng.integers(len(lung))]
    r_xy = max(1.5, radius * min(volume.shape[:2]))
    r_z = max(1.0, r_xy * volume.shape[2] / max(volume.shape[:2]))
    grid = np.meshgrid(*[np.arange(s) for s in volume.shape], indexing="ij")
    ball = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, (r_xy, r_xy, r_z), strict=True)) <= 1
    out = volume.copy()
    out[ball] = 40.0 + rng.normal(0, 15, int(ball.sum()))
    return out


def _save(volume: np.ndarray, path: Path, dtype: type) -> None:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(volume.astype(dtype), PHANTOM_AFFINE), path)


def write_phantom_volumes(root: str | os.PathLike, task: str = "segmentation", num_volumes: int = 8,
                          shape: Sequence[int] = (64, 64, 16), seed: int = 0) -> Path:
    """Write ``num_volumes`` torso phantoms of ``shape`` (X, Y, Z) for ``task`` under ``root``, once.

    See the module docstring for the layouts. The folder is built in a temporary sibling and renamed (an
    interrupted call leaves nothing half-written); a later call with the same arguments returns at once.
    """
    if task not in PHANTOM_TASKS:
        raise ValueError(f"unknown phantom task {task!r}; valid: {list(PHANTOM_TASKS)}")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1 or min(shape[:2]) < 8:
        raise ValueError(f"phantom shape must be (X, Y, Z) with X, Y >= 8 and Z >= 1, got {list(shape)}")
    if int(num_volumes) < 1:
        raise ValueError(f"num_volumes must be >= 1, got {num_volumes}")
    stamp = {"version": _VERSION, "task": task, "num_volumes": int(num_volumes), "shape": list(shape), "seed": seed}

    def fill(tmp: Path) -> None:
        rng = np.random.default_rng(seed)
        for i in range(int(num_volumes)):
            name = f"torso_{i:02d}.nii.gz"
            vol = torso_ct(rng, shape)
            if task == "classification":
                label = CLASSIFICATION_CLASSES[i % len(CLASSIFICATION_CLASSES)]
                _save(add_nodule(vol, rng) if label == "nodule" else vol, tmp / label / name, np.int16)
                continue
            _save(vol, tmp / "images" / name, np.int16)
            if task == "segmentation":
                _save(torso_labels(vol), tmp / "labels" / name, np.uint8)

    return write_folder_once(root, stamp, fill)
