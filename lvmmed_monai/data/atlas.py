"""Real labelled tasks from an MR volume and an atlas aligned to it, for judging pretrained encoders.

Debian's ``mricron-data`` installs the Colin27 T1 brain (``ch2.nii.gz``, 181 x 217 x 181, 1 mm) with the AAL
atlas on the same grid (``aal.nii.gz``; ``aal.nii.txt`` gives each label's name and a 4-digit code whose first
digit is the lobe). Two tasks come from them, with train and test drawn from disjoint axial slices:

* region classification: a patch around a labelled voxel, classed by the lobe of its centre
  (:func:`region_patches`);
* lobe segmentation: whole axial slices with a label map of the lobes (:func:`segmentation_slices`).

The split (:func:`disjoint_slice_split`) alternates blocks of slices and drops ``gap`` slices at each border, so
no test slice has a train slice within ``gap`` mm: neighbouring 1 mm slices are near duplicates.

:func:`colin27_tasks` builds both tasks and the unlabelled pretraining slices (which never include a test slice);
:func:`prepare_mr_data` (``lvmmed mr-data``) writes them as image folders for the pretraining bundle: unlabelled
slices for ``data`` and region patches in ``train/`` and ``test/`` class folders for ``probe_data`` and the
evaluation.
"""

from __future__ import annotations

import json
import os
import shutil
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
    "colin27_tasks",
    "write_slice_pngs",
    "write_labeled_pngs",
    "prepare_mr_data",
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


def colin27_tasks(
    templates: str | os.PathLike = MRICRON_TEMPLATES,
    image_size: int = 64,
    per_class: tuple[int, int] = (100, 50),
    unlabelled: str = "colin+inia19",
    seed: int = 0,
) -> dict:
    """Both tasks on Colin27 + AAL lobes and the unlabelled pretraining volumes, from mricron-data's templates.

    Axial slices with a lobe label are split by :func:`disjoint_slice_split` (blocks of 10, gap 2). Returns
    ``names`` (lobes), ``train_z`` / ``test_z``, ``cls`` (region patches ``(xtr, ytr, xte, yte)``, ``per_class``
    centres per lobe from the train / test slices), ``seg`` (slices at ``image_size`` with lobe maps) and
    ``unlabelled``: volumes in ``[0, 1]`` whose axial slices are the pretraining images. They hold no test slice:
    the train slices of ``ch2``, ``ch2bet`` and ``ch2better`` (0.5 mm; taken at the world z of each train slice)
    and, for ``unlabelled="colin+inia19"``, every slice along the three axes of another brain, the INIA19
    macaque T1 template.
    """
    import nibabel as nib

    if unlabelled not in ("colin", "colin+inia19"):
        raise ValueError(f"unlabelled must be 'colin' or 'colin+inia19', got {unlabelled!r}")
    t = Path(templates)
    image = normalize_volume(load_volume(t / "ch2.nii.gz"))
    lookup, names = aal_lobe_lookup(t / "aal.nii.txt")
    classes = lookup[load_volume(t / "aal.nii.gz")]
    z = np.flatnonzero((classes > 0).any((0, 1)))
    train_z, test_z = disjoint_slice_split(z, block=10, gap=2)
    cls = (*region_patches(image, classes, train_z, per_class=per_class[0], seed=seed),
           *region_patches(image, classes, test_z, per_class=per_class[1], seed=seed + 1))
    seg = (*segmentation_slices(image, classes, train_z, size=image_size),
           *segmentation_slices(image, classes, test_z, size=image_size))
    volumes = [image[:, :, train_z], normalize_volume(load_volume(t / "ch2bet.nii.gz"))[:, :, train_z]]
    better, ch2 = nib.load(str(t / "ch2better.nii.gz")), nib.load(str(t / "ch2.nii.gz"))
    world_z = ch2.affine[2, 2] * train_z + ch2.affine[2, 3]
    kz = np.round((world_z - better.affine[2, 3]) / better.affine[2, 2]).astype(int)
    bvol = normalize_volume(np.asarray(better.dataobj))
    volumes.append(bvol[:, :, kz[(kz >= 0) & (kz < bvol.shape[2])]])
    if unlabelled == "colin+inia19":
        inia = normalize_volume(load_volume(t / "inia19-t1-brain.nii.gz"))
        volumes += [np.moveaxis(inia, axis, 2) for axis in range(3)]
    return {"names": names, "train_z": train_z, "test_z": test_z, "cls": cls, "seg": seg, "unlabelled": volumes}


def _save_png(arr: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8)).save(path)


def write_slice_pngs(volumes: list[np.ndarray], folder: str | os.PathLike, min_range: float = 0.05) -> int:
    """The axial slices (axis 2, rotated anterior-up) of volumes in ``[0, 1]`` as 8-bit PNGs
    ``vol<v>_<slice>.png``; slices with an intensity range below ``min_range`` (outside the brain, which the
    pretraining pipeline would skip with a warning) are left out. Returns the number written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    for v, vol in enumerate(volumes):
        for s in range(vol.shape[2]):
            arr = np.rot90(vol[:, :, s])
            if np.ptp(arr) >= min_range:
                _save_png(arr, folder / f"vol{v}_{s:03d}.png")
                count += 1
    return count


def write_labeled_pngs(images: torch.Tensor, labels: torch.Tensor, names: list[str],
                       folder: str | os.PathLike) -> None:
    """``(N, 1, H, W)`` images in ``[0, 1]`` as ``folder/<class name>/<index>.png`` (spaces in names become
    ``_``): the labelled-folder layout of :func:`lvmmed_monai.evaluation.load_labeled_folder`."""
    for i, (img, label) in enumerate(zip(images, labels.tolist(), strict=True)):
        d = Path(folder) / names[label].replace(" ", "_")
        d.mkdir(parents=True, exist_ok=True)
        _save_png(img[0].numpy(), d / f"{i:05d}.png")


def prepare_mr_data(
    out: str | os.PathLike,
    templates: str | os.PathLike = MRICRON_TEMPLATES,
    per_class: tuple[int, int] = (100, 50),
    unlabelled: str = "colin+inia19",
    seed: int = 0,
) -> dict[str, Path]:
    """Write the pretraining images and the region-classification probe set of :func:`colin27_tasks` as folders:

    * ``out/unlabelled/*.png``: the unlabelled slices (for the pretraining bundle's ``data``);
    * ``out/regions/{train,test}/<lobe>/*.png``: 64 x 64 mm patches labelled by lobe, from disjoint slices
      (for ``probe_data`` and the evaluation's ``data``; a ``train``/``test`` pair is used as the split).

    The folders are built under ``out/.partial`` and moved in place, then ``out/manifest.json`` is written; a
    second call with the same settings finds the manifest and writes nothing.
    """
    out = Path(out)
    settings = {"templates": str(Path(templates).resolve()), "per_class": list(per_class), "unlabelled": unlabelled,
                "seed": seed}
    manifest = out / "manifest.json"
    paths = {"unlabelled": out / "unlabelled", "regions": out / "regions"}
    if manifest.is_file() and json.loads(manifest.read_text()).get("settings") == settings \
            and all(p.is_dir() for p in paths.values()):
        return paths
    tasks = colin27_tasks(templates, per_class=per_class, unlabelled=unlabelled, seed=seed)
    partial = out / ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    n = write_slice_pngs(tasks["unlabelled"], partial / "unlabelled")
    xtr, ytr, xte, yte = tasks["cls"]
    write_labeled_pngs(xtr, ytr, tasks["names"], partial / "regions" / "train")
    write_labeled_pngs(xte, yte, tasks["names"], partial / "regions" / "test")
    manifest.unlink(missing_ok=True)
    for key, path in paths.items():
        shutil.rmtree(path, ignore_errors=True)
        os.replace(partial / key, path)
    partial.rmdir()
    counts = {"unlabelled": n, "region_train": len(ytr), "region_test": len(yte), "lobes": tasks["names"],
              "train_slices": len(tasks["train_z"]), "test_slices": len(tasks["test_z"])}
    tmp = manifest.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"settings": settings, "counts": counts}, indent=1))
    os.replace(tmp, manifest)
    return paths
