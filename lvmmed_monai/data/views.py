"""Two augmented views with coordinate tracking (LVM-Med Sec. 3.2.1; appendix A ``Xs, Poss = s(X)``).

The local cost of Eq. 2 pairs feature-map positions of two views through the original image, so every
view carries, beside its pixels, the original-image coordinates of each of its pixels. The tracking is
done by the MONAI transforms themselves: two channels holding every pixel's normalised ``(y, x)`` are
appended to the image, the stack goes through the *same* spatial transforms (crop, resize, flip, zoom;
bilinear, so the coordinate ramps stay exact inside the image), and is split afterwards; the intensity
transforms see the image only. No crop/flip parameters have to be recorded or replayed.

Coordinates are pixel centres normalised to the original image, ``((r + 0.5) / H, (c + 0.5) / W)`` in
``(0, 1)``, so images of different sizes share one frame (the paper compares positions of different
images' views in that frame for ``i != a``).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    MapTransform,
    RandAdjustContrast,
    RandFlip,
    RandGaussianNoise,
    RandGaussianSmooth,
    Randomizable,
    RandScaleCrop,
    RandScaleIntensity,
    RandScaleIntensityFixedMean,
    RandZoom,
    RepeatChannel,
    Resize,
    ThresholdIntensity,
)
from monai.utils import convert_to_tensor, ensure_tuple_rep

__all__ = ["LVMMedViewsd", "coordinate_grid", "transform_with_coords", "pool_coords", "share_random_state"]


def coordinate_grid(height: int, width: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``(2, H, W)`` float32 map of each pixel centre's normalised ``(y, x)``: ``((r+.5)/H, (c+.5)/W)``."""
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"))


def _as_image(image: object) -> torch.Tensor:
    img = convert_to_tensor(image, dtype=torch.float32, track_meta=False)
    if img.ndim != 3:
        raise ValueError(
            f"LVM-Med views take 2D channel-first images (C, H, W), got shape {tuple(img.shape)}; slice 3D "
            "volumes to 2D first (the paper trains on 2D slices) and add a channel dimension "
            "(EnsureChannelFirstd)."
        )
    if not torch.isfinite(img).all():
        raise ValueError("image contains NaN or Inf; clean or clip it before the LVM-Med views")
    return img


def transform_with_coords(
    image: object,
    spatial: Callable[[torch.Tensor], torch.Tensor],
    intensity: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``spatial`` to image + coordinate channels together, ``intensity`` to the image only.

    Args:
        image: ``(C, H, W)`` array or tensor.
        spatial: a MONAI array transform (or Compose) acting on all channels alike, e.g. crop, Resize
            (bilinear), flips, zoom. Interpolating modes must be linear for the coordinates to stay exact.
        intensity: optional array transform for the image channels.

    Returns:
        ``(view (C, H', W'), coords (2, H', W'))``: the transformed image and the original-image ``(y, x)``
        of each of its pixels, normalised as in :func:`coordinate_grid`.
    """
    img = _as_image(image)
    channels = img.shape[0]
    stacked = torch.cat([img, coordinate_grid(img.shape[1], img.shape[2], img.device)])
    out = convert_to_tensor(spatial(stacked), track_meta=False)
    view, coords = out[:channels], out[channels:]
    if intensity is not None:
        view = convert_to_tensor(intensity(view), track_meta=False)
    return view, coords


def pool_coords(coords: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``(N, 2, H, W)`` pixel coordinates -> ``(N, 2, R, S)``: the mean coordinate of each feature-map cell.

    Average pooling, not subsampling: a feature-map position summarises its cell, so its location is the
    cell's centre in the original image (``F.adaptive_avg_pool2d`` handles sizes that do not divide).
    """
    if coords.ndim != 4 or coords.shape[1] != 2:
        raise ValueError(f"coords must be (N, 2, H, W) maps of normalised (y, x), got {tuple(coords.shape)}")
    if tuple(coords.shape[-2:]) == tuple(size):
        return coords
    return F.adaptive_avg_pool2d(coords, tuple(size))


def share_random_state(transform: Callable, state: np.random.RandomState) -> None:
    """Point ``transform`` and every random transform inside it (through nested ``Compose``) at ``state``.

    MONAI's ``Compose.set_random_state`` gives each child a new ``RandomState`` (an MT19937 seeding, ~0.1 ms):
    24 per sample for the two views, about 30% of the pretraining data pipeline's time. One stream shared
    by all of them, drawn in the transforms' fixed order, keeps every view a function of the sample's seed
    at the cost of one seeding.
    """
    if isinstance(transform, Compose):
        Randomizable.set_random_state(transform, state=state)
        for child in transform.transforms:
            share_random_state(child, state)
    elif isinstance(transform, Randomizable):
        transform.set_random_state(state=state)  # the transform's own override passes it to inner ones


def _spatial(size: tuple[int, int], scale: tuple[float, float], hflip: float, vflip: float,
             zoom_prob: float, zoom: tuple[float, float]) -> Compose:
    """Random resized crop (independent side fractions -> random area and aspect), flips, zoom."""
    return Compose([
        RandScaleCrop(roi_scale=scale[0], max_roi_scale=scale[1], random_center=True, random_size=True),
        Resize(spatial_size=size, mode="bilinear"),
        RandFlip(prob=hflip, spatial_axis=1),
        RandFlip(prob=vflip, spatial_axis=0),
        # zoom < 1 pads by edge replication: the padded pixels copy the border pixels *and* their coordinates
        RandZoom(prob=zoom_prob, min_zoom=zoom[0], max_zoom=zoom[1], mode="bilinear", padding_mode="edge"),
    ])


def _intensity(brightness: float, contrast: float, jitter_prob: float, gamma: tuple[float, float],
               blur_prob: float, blur_sigma: tuple[float, float], noise_prob: float,
               noise_std: float) -> Compose:
    """Colour/contrast jitter, gamma, Gaussian blur and noise, then clipping back to [0, 1]."""
    return Compose([
        RandScaleIntensity(factors=brightness, prob=jitter_prob),  # brightness: x * (1 + U(-b, b))
        RandScaleIntensityFixedMean(factors=contrast, prob=jitter_prob),  # contrast around the mean
        RandAdjustContrast(prob=jitter_prob * 0.5, gamma=gamma),
        RandGaussianSmooth(sigma_x=blur_sigma, sigma_y=blur_sigma, prob=blur_prob),
        RandGaussianNoise(prob=noise_prob, std=noise_std),
        ThresholdIntensity(threshold=1.0, above=False, cval=1.0),  # min(x, 1)
        ThresholdIntensity(threshold=0.0, above=True, cval=0.0),  # max(x, 0)
    ])


class LVMMedViewsd(Randomizable, MapTransform):
    """Dictionary transform: one image -> two augmented views ``s``, ``t`` (+ local crops) with coordinates.

    For every key ``k`` (all keys are images sharing one geometry) it writes ``{k}_s``, ``{k}_t``
    (``(C', size, size)``) and, once, ``{coords_key}_s``, ``{coords_key}_t`` (``(2, size, size)``, the
    normalised original ``(y, x)`` of each pixel, see :func:`transform_with_coords`); with
    ``num_local_crops = m`` also ``{k}_l0`` .. ``{k}_l{m-1}`` and ``{coords_key}_l*`` at ``local_size``
    (multi-crop; pair each with a global view in :class:`~lvmmed_monai.ssl.loss.LVMMedLoss`).

    Input images are ``(C, H, W)``, any ``C``, intensities in ``[0, 1]`` (views are clipped to ``[0, 1]``;
    normalise, e.g. with ImageNet statistics, afterwards).
    ``out_channels`` replicates a 1-channel image to what the encoder takes (3 for ImageNet-style
    ResNet-50 / ViT weights) after augmentation, so the channels of a grey image stay identical; None keeps
    the input channels (for encoders built with ``in_channels=1``).

    Args:
        keys: image keys.
        size: global view size (int or ``(h, w)``).
        crop_scale: range of the crop side as a fraction of the image side, drawn per axis (random area
            ``~[0.09, 1]`` and aspect ratio at the default), then resized to ``size`` (bilinear).
        hflip_prob / vflip_prob: flip probabilities (paper: horizontal flip 50%).
        zoom_prob / zoom_range: RandZoom (bilinear, keep size, edge padding for zoom < 1).
        brightness / contrast / jitter_prob: colour jitter (relative intensity and contrast scaling).
        gamma_range: random gamma (applied with ``jitter_prob / 2``).
        blur_prob / blur_sigma: Gaussian blur, sigma in pixels.
        noise_prob / noise_std: additive Gaussian noise (std drawn in ``[0, noise_std]``).
        num_local_crops / local_size / local_crop_scale: multi-crop small views.
        out_channels: None, or the channel count to produce (1-channel inputs are replicated).
        coords_key: prefix of the coordinate outputs.
        keep_original: keep the input keys (default False: originals of different sizes would not collate).
    """

    def __init__(
        self,
        keys: KeysCollection,
        size: int | Sequence[int] = 96,
        crop_scale: tuple[float, float] = (0.3, 1.0),
        hflip_prob: float = 0.5,
        vflip_prob: float = 0.0,
        zoom_prob: float = 0.2,
        zoom_range: tuple[float, float] = (1.0, 1.25),
        brightness: float = 0.4,
        contrast: float = 0.4,
        jitter_prob: float = 0.8,
        gamma_range: tuple[float, float] = (0.7, 1.5),
        blur_prob: float = 0.5,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        noise_prob: float = 0.2,
        noise_std: float = 0.03,
        num_local_crops: int = 0,
        local_size: int | Sequence[int] = 48,
        local_crop_scale: tuple[float, float] = (0.2, 0.5),
        out_channels: int | None = None,
        coords_key: str = "coords",
        keep_original: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        for scale in (crop_scale, local_crop_scale):
            if not 0.0 < scale[0] <= scale[1] <= 1.0:
                raise ValueError(f"crop scales must satisfy 0 < low <= high <= 1, got {scale}")
        if num_local_crops < 0 or (out_channels is not None and out_channels < 1):
            raise ValueError(
                f"num_local_crops must be >= 0 and out_channels >= 1, got {num_local_crops}, {out_channels}"
            )
        geo = (hflip_prob, vflip_prob, zoom_prob, zoom_range)
        size2 = ensure_tuple_rep(size, 2)
        local2 = ensure_tuple_rep(local_size, 2)
        self.views: dict[str, tuple[Compose, Compose]] = {}
        for name in ("s", "t", *(f"l{j}" for j in range(num_local_crops))):
            is_global = name in ("s", "t")
            scale = crop_scale if is_global else local_crop_scale
            spatial = _spatial(size2 if is_global else local2, scale, *geo)
            intensity = _intensity(brightness, contrast, jitter_prob, gamma_range, blur_prob, blur_sigma,
                                   noise_prob, noise_std)
            self.views[name] = (spatial, intensity)
        self.out_channels = out_channels
        self.coords_key = coords_key
        self.keep_original = keep_original

    def set_random_state(self, seed: int | None = None, state=None) -> LVMMedViewsd:
        """Seed this transform; every inner random transform draws from the same stream
        (:func:`share_random_state`), so the views are a function of the seed and DataLoader workers differ."""
        super().set_random_state(seed, state)
        for spatial, intensity in self.views.values():
            share_random_state(spatial, self.R)
            share_random_state(intensity, self.R)
        return self

    def randomize(self, data: object = None) -> None:
        """Randomness lives in the inner MONAI transforms, drawn on each call."""

    def _channels(self, view: torch.Tensor) -> torch.Tensor:
        if self.out_channels is None or view.shape[0] == self.out_channels:
            return view
        if view.shape[0] != 1:
            raise ValueError(
                f"out_channels={self.out_channels} but the image has {view.shape[0]} channels; only "
                "1-channel images are replicated. Set out_channels=None or build the encoder with the "
                "image's channels."
            )
        return convert_to_tensor(RepeatChannel(self.out_channels)(view), track_meta=False)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        images = [_as_image(d[k]) for k in keys]
        if len({tuple(im.shape[1:]) for im in images}) != 1:
            shapes = [tuple(im.shape) for im in images]
            raise ValueError(f"all keys must share one spatial size, got {shapes}")
        splits = [im.shape[0] for im in images]
        stacked = torch.cat(images)
        for name, (spatial, intensity) in self.views.items():
            view, coords = transform_with_coords(stacked, spatial)
            for key, part in zip(keys, torch.split(view, splits), strict=True):
                part = convert_to_tensor(intensity(part), track_meta=False)
                d[f"{key}_{name}"] = self._channels(part)
            d[f"{self.coords_key}_{name}"] = coords
        if not self.keep_original:
            for key in keys:
                del d[key]
        return d
