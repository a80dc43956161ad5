"""Generated medical-like phantoms: the pretraining bundle's built-in collection and a labeled probe set.

Nothing is downloaded (DESIGN.md). :func:`write_default_collection` writes, once, a small mixed collection in
the file formats users have, so that the whole file pipeline runs on it: CT-like torso volumes as NIfTI
(Hounsfield units), MR-like head volumes as DICOM series (through SimpleITK), chest-radiograph-like PNGs and
ultrasound-like JPEGs, one sub-folder per modality. :func:`shape_phantoms` makes a labeled 2D set (4 object
shapes on textured backgrounds) for the frozen-encoder probes of ``evaluate.yaml``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lvmmed_monai.io import write_folder_once

__all__ = ["write_default_collection", "shape_phantoms", "SHAPE_CLASSES", "torso_ct", "write_shape_phantoms"]

SHAPE_CLASSES = ("ellipse", "rectangle", "triangle", "cross")
_COLLECTION_VERSION = 2


def _grid(shape: tuple[int, ...]) -> list[np.ndarray]:
    return np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")


def _ellipsoid(coords: list[np.ndarray], centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    return sum(((c - m) / r) ** 2 for c, m, r in zip(coords, centre, radii, strict=True)) <= 1


def _rotated(coords: list[np.ndarray], angle: float, shift: np.ndarray) -> list[np.ndarray]:
    """In-plane rotation and shift of the first two grid coordinates (per-image pose)."""
    c, s = np.cos(angle), np.sin(angle)
    x, y = coords[0] - shift[0], coords[1] - shift[1]
    return [c * x - s * y, s * x + c * y, *coords[2:]]


def _findings(
    rng: np.random.Generator,
    coords: list[np.ndarray],
    count: tuple[int, int],
    radius: tuple[float, float],
    values: tuple[float, ...],
    inside: np.ndarray,
    z_radius: tuple[float, float] = (0.15, 0.35),
) -> np.ndarray:
    """Random nodules / lesions / cysts: ``count`` ellipsoids at random places (a value each), kept ``inside``.

    They make every image (and every few slices of a volume) different from its neighbours, as lesions and
    anatomy do in real collections, so that telling two images apart is learnable (instance discrimination
    is what the graph matching rewards); anatomy alone would leave many near-identical images.
    """
    out = np.full(inside.shape, np.nan)
    for _ in range(rng.integers(count[0], count[1] + 1)):
        centre = [rng.uniform(-0.6, 0.6), rng.uniform(-0.6, 0.6)]
        radii = list(rng.uniform(radius[0], radius[1], 2))
        if len(coords) == 3:
            centre.append(rng.uniform(-0.9, 0.9))
            radii.append(rng.uniform(*z_radius))
        out[_ellipsoid(coords, np.array(centre), np.array(radii)) & inside] = rng.choice(values)
    return out


def torso_ct(rng: np.random.Generator, shape: tuple[int, int, int] = (96, 96, 28)) -> np.ndarray:
    """CT-like torso in HU: body, fat rim, two lungs, spine, liver, vessels; shapes drift along z."""
    x, y, z = _grid(shape)
    vol = np.full(shape, -1000.0)
    body_r = np.array([0.85, 0.6, 2.0]) * rng.uniform(0.85, 1.05, 3)
    body = _ellipsoid([x, y, z], np.zeros(3), body_r)
    vol[body] = -100.0
    vol[_ellipsoid([x, y, z], np.zeros(3), body_r - [0.08, 0.08, 0])] = 40.0
    for side in (-1, 1):
        lung = _ellipsoid([x, y, z], np.array([0.4 * side, -0.05, rng.uniform(-0.3, 0.3)]),
                          np.array([0.28, 0.38, 1.1]) * rng.uniform(0.8, 1.1, 3))
        vol[lung & body] = -820.0
    vol[_ellipsoid([x, y], np.array([0.0, 0.42]), np.array([0.12, 0.12]))] = 700.0
    vol[_ellipsoid([x, y, z], np.array([-0.35, 0.1, -0.8]), np.array([0.4, 0.35, 0.9]))] = 60.0
    for _ in range(3):
        c = np.append(rng.uniform(-0.3, 0.3, 2), 0)
        vol[_ellipsoid([x, y], c[:2], np.array([0.05, 0.05]) * rng.uniform(0.7, 1.5))] = 200.0
    return vol + rng.normal(0, 15, shape)


def _torso_ct_varied(rng: np.random.Generator, shape: tuple[int, int, int] = (96, 96, 12)) -> np.ndarray:
    """:func:`torso_ct` in a random pose with random nodules, lesions and cysts (the pretraining collection).

    A separate function: the labeled phantoms (``volume_phantoms``) derive their labels from
    :func:`torso_ct`'s intensities and must keep it as it is.
    """
    coords = _rotated(_grid(shape), rng.uniform(-0.3, 0.3), rng.uniform(-0.1, 0.1, 2))
    x, y, z = coords
    vol = np.full(shape, -1000.0)
    body_r = np.array([0.85, 0.6, 2.0]) * rng.uniform(0.8, 1.05, 3)
    body = _ellipsoid(coords, np.zeros(3), body_r)
    vol[body] = -100.0
    vol[_ellipsoid(coords, np.zeros(3), body_r - [0.08, 0.08, 0])] = 40.0
    lungs = np.zeros(shape, bool)
    for side in (-1, 1):
        lungs |= _ellipsoid(coords, np.array([0.4 * side, -0.05, rng.uniform(-0.5, 0.5)]),
                            np.array([0.28, 0.38, 1.1]) * rng.uniform(0.7, 1.15, 3)) & body
    vol[lungs] = -820.0
    vol[_ellipsoid([x, y], np.array([0.0, 0.42]), np.array([0.12, 0.12]))] = 700.0
    vol[_ellipsoid(coords, np.array([-0.35, 0.1, rng.uniform(-1.2, 0.0)]), np.array([0.4, 0.35, 0.9]))] = 60.0
    found = _findings(rng, coords, (6, 12), (0.06, 0.2), (-500.0, 60.0, 250.0, 900.0), body)
    vol = np.where(np.isnan(found), vol, found)
    return vol + rng.normal(0, 15, shape)


def _head_mr(rng: np.random.Generator, shape: tuple[int, int, int] = (80, 80, 12)) -> np.ndarray:
    """MR-like head: skull ring, brain, ventricles and random lesions (arbitrary units), in a random pose."""
    coords = _rotated(_grid(shape), rng.uniform(-0.4, 0.4), rng.uniform(-0.1, 0.1, 2))
    r = np.array([0.8, 0.9, 1.6]) * rng.uniform(0.85, 1.05, 3)
    vol = np.zeros(shape)
    vol[_ellipsoid(coords, np.zeros(3), r)] = 300.0
    brain = _ellipsoid(coords, np.zeros(3), r - [0.1, 0.1, 0.1])
    vol[brain] = 650.0
    size = rng.uniform(0.6, 1.4)
    for side in (-1, 1):
        vol[_ellipsoid(coords, np.array([0.15 * side, -0.05, 0]), np.array([0.1, 0.3, 0.6]) * size)] = 150.0
    found = _findings(rng, coords, (4, 9), (0.06, 0.2), (50.0, 400.0, 950.0), brain)
    vol = np.where(np.isnan(found), vol, found)
    return np.clip(vol + rng.normal(0, 20, shape), 0, None)


def _chest_xray(rng: np.random.Generator, size: int = 128) -> np.ndarray:
    """Radiograph-like 2D image in [0, 1]: body, lungs with rib bands, heart shadow, random nodules and pose."""
    x, y = _rotated(_grid((size, size))[::-1], rng.uniform(-0.25, 0.25), rng.uniform(-0.1, 0.1, 2))
    body = _ellipsoid([x, y], np.zeros(2), np.array([0.9, 1.1]) * rng.uniform(0.8, 1.05, 2))
    img = 0.15 + 0.55 * body
    freq, phase = rng.uniform(10, 22), rng.uniform(0, 2 * np.pi)
    for side in (-1, 1):
        lung = _ellipsoid([x, y], np.array([0.38 * side, -0.1]), np.array([0.3, 0.55]) * rng.uniform(0.75, 1.15, 2))
        ribs = 0.12 * (np.sin(y * freq + phase + side * x * 3) > 0.6)
        img = np.where(lung, 0.25 + ribs, img)
    img = np.where(_ellipsoid([x, y], np.array([rng.uniform(-0.05, 0.25), 0.2]),
                              np.array([0.25, 0.3]) * rng.uniform(0.7, 1.3, 2)), 0.6, img)
    found = _findings(rng, [x, y], (1, 4), (0.05, 0.18), (0.05, 0.45, 0.95), body)
    img = np.where(np.isnan(found), img, found)
    return np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1)


def _ultrasound(rng: np.random.Generator, size: int = 112) -> np.ndarray:
    """Ultrasound-like 2D image: a fan with speckle, dark cysts and bright echogenic foci."""
    y, x = _grid((size, size))
    radius, angle = np.hypot(x, y + 1.0), np.arctan2(x, y + 1.0)
    fan = (radius < rng.uniform(1.5, 1.95)) & (np.abs(angle) < rng.uniform(0.45, 0.75))
    img = fan * (0.5 + 0.2 * np.sin(radius * rng.uniform(4, 8) + rng.uniform(0, 2 * np.pi)))
    found = _findings(rng, [x, y], (1, 4), (0.06, 0.22), (0.05, 0.08, 1.0), fan)
    img = np.where(np.isnan(found), img, found)
    return np.clip(img * rng.gamma(4.0, 0.25, img.shape), 0, 1)


def _write_dicom_series(volume: np.ndarray, folder: Path, modality: str = "MR") -> None:
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.moveaxis(volume, -1, 0)).astype(np.int16))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.2.1125." + "".join(str(d) for d in np.random.default_rng(len(str(folder))).integers(
        0, 10, 12))
    for k in range(img.GetDepth()):
        sl = img[:, :, k]
        for tag, value in (("0008|0060", modality), ("0020|000e", uid), ("0020|0013", str(k + 1)),
                           ("0020|0032", f"0\\0\\{k * 2.0}"), ("0020|0037", "1\\0\\0\\0\\1\\0"),
                           ("0018|0050", "2.0"), ("0008|0008", "ORIGINAL\\PRIMARY\\AXIAL")):
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice_{k:03d}.dcm"))
        writer.Execute(sl)


def write_default_collection(root: str | os.PathLike, seed: int = 0, scale: int = 1) -> Path:
    """Write the built-in pretraining collection under ``root`` once and return its folder.

    ``root/ct/*.nii.gz`` (6 torso volumes of 12 slices), ``root/mr/<series>/*.dcm`` (4 head series of 12
    slices), ``root/xr/*.png`` (120 radiographs), ``root/us/*.jpg`` (80 ultrasound images); ``scale``
    multiplies the counts. 320 2D images at scale 1, each in a random pose with random findings, so that
    pretraining can learn to tell them apart (10 iterations per epoch at the bundle's batch of 32). The folder
    is built in a temporary sibling and renamed, so an interrupted call leaves nothing half-written; a later
    call with the same arguments returns at once.
    """
    import nibabel as nib
    from PIL import Image

    stamp = {"version": _COLLECTION_VERSION, "seed": seed, "scale": scale}

    def fill(tmp: Path) -> None:
        rng = np.random.default_rng(seed)
        for sub in ("ct", "xr", "us"):
            (tmp / sub).mkdir()
        for i in range(6 * scale):
            vol = _torso_ct_varied(rng).astype(np.int16)
            nib.save(nib.Nifti1Image(vol, np.diag([1.0, 1.0, 2.5, 1.0])), tmp / "ct" / f"torso_{i:02d}.nii.gz")
        for i in range(4 * scale):
            _write_dicom_series(_head_mr(rng), tmp / "mr" / f"series_{i:02d}")
        for i in range(120 * scale):
            Image.fromarray((_chest_xray(rng) * 255).astype(np.uint8)).save(tmp / "xr" / f"cxr_{i:03d}.png")
        for i in range(80 * scale):
            Image.fromarray((_ultrasound(rng) * 255).astype(np.uint8)).save(tmp / "us" / f"us_{i:03d}.jpg",
                                                                            quality=90)

    return write_folder_once(root, stamp, fill, stamp_name="collection.json")


def shape_phantoms(n: int, size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labeled probe set: ``(n, 1, size, size)`` float32 images in [0, 1] and ``(n,)`` labels.

    Each image holds one object of class ``SHAPE_CLASSES[label]`` (random position, size, rotation and
    contrast) on a smooth random background with noise; classes are balanced.
    """
    rng = np.random.default_rng(seed)
    y, x = _grid((size, size))
    images, labels = np.zeros((n, 1, size, size), np.float32), np.arange(n) % len(SHAPE_CLASSES)
    rng.shuffle(labels)
    for i, label in enumerate(labels):
        cx, cy = rng.uniform(-0.35, 0.35, 2)
        r, th = rng.uniform(0.25, 0.5), rng.uniform(0, np.pi)
        u = ((x - cx) * np.cos(th) + (y - cy) * np.sin(th)) / r
        v = (-(x - cx) * np.sin(th) + (y - cy) * np.cos(th)) / r
        if label == 0:
            mask = u**2 + (v / rng.uniform(0.5, 0.9)) ** 2 <= 1
        elif label == 1:
            mask = (np.abs(u) <= 1) & (np.abs(v) <= rng.uniform(0.5, 0.9))
        elif label == 2:
            mask = (v >= -0.5) & (v <= 1 - 1.7 * np.abs(u))
        else:
            w = rng.uniform(0.25, 0.4)
            mask = ((np.abs(u) <= 1) & (np.abs(v) <= w)) | ((np.abs(v) <= 1) & (np.abs(u) <= w))
        background = 0.3 + 0.15 * (rng.uniform(-1, 1) * x + rng.uniform(-1, 1) * y)
        img = background + rng.uniform(0.25, 0.5) * mask * rng.choice([-1, 1])
        images[i, 0] = np.clip(img + rng.normal(0, 0.05, img.shape), 0, 1)
    return images, labels.astype(np.int64)

_SHAPE_PHANTOM_VERSION = 1


def write_shape_phantoms(root: str | os.PathLike, num_images: int = 96, size: int = 64, seed: int = 0) -> Path:
    """Write ``num_images`` labeled 2D phantoms (one object of a class of :data:`SHAPE_CLASSES` on a textured
    background, classes balanced) as ``root/<class>/shape_NNN.png`` (grey, 0-255), once; built in a temporary
    sibling folder and renamed."""
    if int(num_images) < 2 * len(SHAPE_CLASSES) or int(size) < 16:
        raise ValueError(f"need num_images >= {2 * len(SHAPE_CLASSES)} (2 per class) and size >= 16, got "
                         f"{num_images}, {size}")
    from PIL import Image

    def fill(tmp: Path) -> None:
        images, labels = shape_phantoms(int(num_images), size=int(size), seed=seed)
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            folder = tmp / SHAPE_CLASSES[int(label)]
            folder.mkdir(exist_ok=True)
            Image.fromarray((image[0] * 255).round().astype(np.uint8)).save(folder / f"shape_{i:03d}.png")

    stamp = {"version": _SHAPE_PHANTOM_VERSION, "num_images": int(num_images), "size": int(size), "seed": seed}
    return write_folder_once(root, stamp, fill)
