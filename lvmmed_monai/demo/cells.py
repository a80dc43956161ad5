"""Generated fluorescence-microscopy-like cell images with instance labels, and VISTA-2D's training targets.

A stand-in for the cell collections of MONAI's VISTA-2D bundle (Cellpose, LIVECell, TissueNet...) so that its
training can be shown without data: tens of elliptical cells per image, some touching, with a cytoplasm stain,
a nucleus stain, blur, uneven illumination and noise.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["cell_images", "cell_flow_targets"]


def _instances(rng: np.random.Generator, size: int) -> np.ndarray:
    """One ``(size, size)`` instance map: each pixel goes to the covering ellipse it is deepest inside."""
    k = int(rng.integers(15, 41))
    centre = rng.uniform(0, size, (k, 2)).astype(np.float32)
    axes = size * rng.uniform(0.03, 0.065, (k, 1)) * np.stack([np.ones(k), rng.uniform(0.6, 1.0, k)], 1)
    axes, angle = axes.astype(np.float32), rng.uniform(0, np.pi, k).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dy, dx = yy[None] - centre[:, 0, None, None], xx[None] - centre[:, 1, None, None]
    c, s = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    u, v = dx * c + dy * s, -dx * s + dy * c
    depth = (u / axes[:, 0, None, None]) ** 2 + (v / axes[:, 1, None, None]) ** 2  # (k, size, size), <= 1 inside
    nearest = depth.argmin(0)
    labels = np.where(depth.min(0) <= 1, nearest + 1, 0)
    return _keep_largest_parts(labels)


def _keep_largest_parts(labels: np.ndarray) -> np.ndarray:
    """Each id keeps its largest 4-connected part (an overlap can cut a thin piece off), renumbered 1..K; the
    pieces cut off become background."""
    out = np.zeros_like(labels)
    next_id = 1
    for i, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        parts, n = ndimage.label(labels[box] == i)
        if n == 0:
            continue
        largest = 1 + int(np.argmax(np.bincount(parts.ravel())[1:]))
        out[box][parts == largest] = next_id
        next_id += 1
    return out


def cell_images(n: int, size: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` generated fluorescence images and their instance labels.

    Returns ``images`` float32 ``(n, 3, size, size)`` in [0, 1] (RGB composite: red a faint autofluorescence
    background, green the cytoplasm stain of every cell, blue a nucleus stain in the middle of each) and
    ``labels`` int64 ``(n, size, size)``: 0 background, 1..K one connected region per cell. Cells are 15-40
    ellipses (long semi-axis 3-6.5 % of ``size``, the short one 60-100 % of it) at random places, so some
    touch; where ellipses overlap each pixel goes to the one it is deepest inside. Per-cell brightness, blur,
    uneven illumination and noise make the task not quite a threshold.
    """
    if int(n) < 1 or int(size) < 16:
        raise ValueError(f"need n >= 1 and size >= 16, got {n}, {size}")
    rng = np.random.default_rng(seed)
    size = int(size)
    images = np.empty((n, 3, size, size), np.float32)
    labels = np.empty((n, size, size), np.int64)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        lab = _instances(rng, size)
        labels[i] = lab
        k = int(lab.max())
        brightness = np.concatenate([[0.0], rng.uniform(0.35, 0.9, k)])
        cyto = brightness[lab]
        # nucleus: the inner part of each cell, by distance to its border relative to the cell's deepest pixel
        depth = ndimage.distance_transform_edt(lab > 0)
        deepest = np.zeros(k + 1)
        np.maximum.at(deepest, lab.ravel(), depth.ravel())
        nucleus = (lab > 0) & (depth >= 0.55 * deepest[lab])
        light = 0.8 + 0.2 * np.cos(np.pi * (xx - rng.uniform())) * np.cos(np.pi * (yy - rng.uniform()))
        blur = max(size / 256, 0.5)
        green = ndimage.gaussian_filter(cyto, blur) * light
        blue = ndimage.gaussian_filter(nucleus * (0.5 + brightness[lab]), blur) * light
        red = 0.08 + 0.1 * ndimage.gaussian_filter(rng.random((size, size)), 4 * blur)
        stack = np.stack([red, green, blue]) + rng.normal(0, 0.04, (3, size, size))
        images[i] = np.clip(stack, 0, 1)
    return images, labels


def cell_flow_targets(labels: np.ndarray) -> np.ndarray:
    """VISTA-2D's 3 target channels for instance labels ``(n, H, W)``: float32 ``(n, 3, H, W)``.

    Channel 0 is the foreground (cell probability target), channels 1-2 the flow ``(dy, dx)``: the unit
    vector from each cell pixel to its cell's centre of mass, 0 on the background. This simplifies
    cellpose's flows (``cellpose.dynamics.masks_to_flows``: the normalised gradient of a heat diffusion from
    the cell's centre, which VISTA-2D computes with cellpose): same direction on convex cells, same unit
    length, without the dependency. Vectorised over all images and cells at once.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3 or labels.min(initial=0) < 0:
        raise ValueError(f"labels must be non-negative instance ids (n, H, W), got shape {labels.shape}")
    n, h, w = labels.shape
    stride = int(labels.max()) + 1
    group = (np.arange(n)[:, None, None] * stride + labels).ravel()  # one id per (image, cell)
    yy, xx = np.broadcast_to(np.mgrid[0:h, 0:w][:, None], (2, n, h, w)).reshape(2, -1).astype(np.float64)
    count = np.maximum(np.bincount(group, minlength=n * stride), 1)
    cy = np.bincount(group, yy, n * stride) / count
    cx = np.bincount(group, xx, n * stride) / count
    vec = np.stack([cy[group] - yy, cx[group] - xx])
    norm = np.linalg.norm(vec, axis=0)
    fg = labels.ravel() > 0
    vec = np.where(fg & (norm > 1e-6), vec / np.maximum(norm, 1e-6), 0.0)
    out = np.concatenate([fg[None], vec]).reshape(3, n, h, w).transpose(1, 0, 2, 3)
    return np.ascontiguousarray(out, dtype=np.float32)
