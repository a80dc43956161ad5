"""Real labelled tasks from an MR volume and an atlas aligned to it, for judging pretrained encoders.

Debian's ``mricron-data`` installs the Colin27 T1 brain (``ch2.nii.gz``, 181 x 217 x 181, 1 mm) with the AAL
atlas on the same grid (``aal.nii.gz``; ``aal.nii.txt`` gives each label's name and a 4-digit code whose first
digit is the lobe). Two tasks come from them, with train and test drawn from disjoint axial slices:

* region classification: a patch around a labelled voxel, classed by the lobe of its centre
  (:func:`region_patches`);
* lobe segmentation: whole axial slices with a label map of the lobes (:func:`segmentation_slices`).

The split (:func:`disjoint_slice_split`) alternates blocks of slices and drops ``gap`` slices at each border, so
no test slice has a train slice within ``gap`` mm: neighbouring 1 mm slices are near duplicates.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "MRICRON_TEMPLATES",
    "AAL_LOBES",
    "load_volume",
    "aal_lobe_lookup",
    "disjoint_slice_split",
    "region_patches",
    "segmentation_slices",
    "normalize_volume",
]

MRICRON_TEMPLATES = Path("/usr/share/mricron/templates")
# First digit of the AAL code -> lobe (AAL's own grouping; 3 is the insula alone).
AAL_LOBES = {2: "frontal", 3: "insula", 4: "limbic", 5: "occipital", 6: "parietal", 7: "deep grey",
             8: "temporal", 9: "cerebellum"}


def load_volume(path: str | os.PathLike) -> np.ndarray:
    """A 3D NIfTI as a numpy array in its stored orientation; clear errors for missing files and non-3D data."""
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        hint = " (install Debian's mricron-data: apt-get install mricron-data)" if MRICRON_TEMPLATES in path.parents \
            else ""
        raise FileNotFoundError(f"{path} not found{hint}")
    arr = np.asarray(nib.load(str(path)).dataobj)
    if arr.ndim != 3:
        raise ValueError(f"{path}: expected a 3D volume, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{path}: volume contains NaN or Inf voxels")
    return arr


def aal_lobe_lookup(label_txt: str | os.PathLike) -> tuple[np.ndarray, list[str]]:
    """``aal.nii.txt`` (``index name code`` per line) -> lookup array ``label -> lobe class + 1`` (0 = none)
    and the lobe names in class order (the lobes of :data:`AAL_LOBES` that occur, by code digit)."""
    rows = []
    for line in Path(label_txt).read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].isdigit() and parts[2].isdigit():
            rows.append((int(parts[0]), int(parts[2][0])))
    if not rows:
        raise ValueError(f"{label_txt}: no 'index name code' lines found")
    digits = sorted({d for _, d in rows if d in AAL_LOBES})
    lookup = np.zeros(max(i for i, _ in rows) + 1, dtype=np.int64)
    for index, digit in rows:
        if digit in AAL_LOBES:
            lookup[index] = digits.index(digit) + 1
    return lookup, [AAL_LOBES[d] for d in digits]


def disjoint_slice_split(slices: np.ndarray | list[int], block: int = 10, gap: int = 2,
                         test_first: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Split sorted slice indices into alternating train / test blocks of ``block`` slices.

    ``gap`` slices at each side of every border between a train and a test block are dropped, so every
    test slice is more than ``gap`` slices away from every train slice. Returns ``(train, test)``.
    """
    s = np.sort(np.asarray(slices, dtype=np.int64))
    if block < 1 or gap < 0 or 2 * gap >= block:
        raise ValueError(f"need block >= 1, gap >= 0 and 2 * gap < block, got block={block}, gap={gap}")
    rank = np.arange(len(s))
    which = (rank // block + int(test_first)) % 2  # 0 = train, 1 = test
    pos = rank % block
    keep = (pos >= gap) & (pos < block - gap)
    keep |= (rank < block) & (pos < gap)  # nothing before the first block
    keep |= (rank // block == (len(s) - 1) // block) & (pos >= block - gap)  # nor after the last
    return s[keep & (which == 0)], s[keep & (which == 1)]


def normalize_volume(volume: np.ndarray, percentiles: tuple[float, float] = (0.5, 99.5)) -> np.ndarray:
    """Intensities to ``[0, 1]`` by the volume's percentiles (as the pretraining data pipeline does)."""
    lo, hi = np.percentile(volume, percentiles)
    if hi <= lo:
        raise ValueError("volume is constant; cannot normalise it")
    return np.clip((volume.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)


def _take_slices(image: np.ndarray, classes: np.ndarray, slices: np.ndarray, axis: int) -> tuple[np.ndarray, ...]:
    """The given slices of the image and of its class map, slice axis first."""
    if image.shape != classes.shape:
        raise ValueError(f"image {image.shape} and class map {classes.shape} must have the same shape")
    return np.moveaxis(image, axis, 0)[slices], np.moveaxis(classes, axis, 0)[slices]


def region_patches(
    image: np.ndarray,
    classes: np.ndarray,
    slices: np.ndarray,
    patch: int = 64,
    per_class: int = 100,
    axis: int = 2,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Patches ``(N, 1, patch, patch)`` around voxels of the given slices, labelled by the class of the centre.

    ``image`` is in ``[0, 1]``; ``classes`` holds ``0`` (no class) or ``class + 1`` per voxel. Up to
    ``per_class`` centres are drawn per class (without replacement, seeded), so classes are balanced where the
    slices allow. Outside the slice the patch is 0.
    """
    rng = np.random.default_rng(seed)
    img, cls = _take_slices(image, classes, slices, axis)
    half = patch // 2
    padded = np.pad(img, ((0, 0), (half, half), (half, half)))
    xs, ys = [], []
    for c in range(1, int(classes.max()) + 1):
        where = np.argwhere(cls == c)
        if len(where) == 0:
            continue
        pick = where[rng.choice(len(where), size=min(per_class, len(where)), replace=False)]
        for s, r, q in pick:  # r, q index the unpadded slice; the patch starts at r - half there
            xs.append(padded[s, r:r + patch, q:q + patch])
            ys.append(c - 1)
    if not xs:
        raise ValueError("no labelled voxel in the given slices")
    return torch.from_numpy(np.stack(xs)[:, None].astype(np.float32)), torch.tensor(ys)


def segmentation_slices(
    image: np.ndarray,
    classes: np.ndarray,
    slices: np.ndarray,
    size: int = 64,
    axis: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole slices padded to a square and resized to ``size``: images ``(N, 1, size, size)`` (bilinear) and
    label maps ``(N, size, size)`` (nearest)."""
    img, lab = (torch.from_numpy(a.astype(np.float32))[:, None] for a in _take_slices(image, classes, slices, axis))
    h, w = img.shape[-2:]
    side = max(h, w)
    pad = ((side - w) // 2, side - w - (side - w) // 2, (side - h) // 2, side - h - (side - h) // 2)
    img, lab = F.pad(img, pad), F.pad(lab, pad)
    img = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    lab = F.interpolate(lab, size=(size, size), mode="nearest")
    return img.clamp(0, 1), lab[:, 0].long()
