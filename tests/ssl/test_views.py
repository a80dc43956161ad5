"""Two-view transform with coordinate tracking: known crops, MONAI pipelines, channels, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset
from monai.transforms import Compose, Flip, Resize, SpatialCrop

from lvmmed_monai.data.views import LVMMedViewsd, coordinate_grid, pool_coords, transform_with_coords

NO_INTENSITY = {"jitter_prob": 0.0, "blur_prob": 0.0, "noise_prob": 0.0}


def test_coordinate_grid_values():
    g = coordinate_grid(4, 8)
    assert g.shape == (2, 4, 8)
    torch.testing.assert_close(g[0, :, 0], torch.tensor([0.125, 0.375, 0.625, 0.875]))
    torch.testing.assert_close(g[1, 0, :2], torch.tensor([1 / 16, 3 / 16]))
    assert torch.equal(g[0, :, 3], g[0, :, 5]) and torch.equal(g[1, 1], g[1, 2])


def _cells(view: torch.Tensor, cell: int) -> list[set[int]]:
    """Original-pixel indices under each feature-map cell (row-major), read from an index image."""
    h, w = view.shape[-2:]
    return [
        set(view[0, r : r + cell, c : c + cell].flatten().long().tolist())
        for r in range(0, h, cell)
        for c in range(0, w, cell)
    ]


def test_location_pairing_matches_same_original_pixels_for_known_crops():
    """View s = rows/cols 0-31, view t = rows/cols 16-47 flipped left-right; 4x4 feature grid of 8 px cells.

    Each s cell in the overlap (rows and cols 16-31) covers exactly the pixels of one t cell; the
    spatially nearest t position found through the tracked coordinates must be that cell (distance 0).
    """
    index_image = torch.arange(64 * 64, dtype=torch.float32).view(1, 64, 64)
    vs, cs = transform_with_coords(index_image, SpatialCrop(roi_start=(0, 0), roi_end=(32, 32)))
    vt, ct = transform_with_coords(
        index_image, Compose([SpatialCrop(roi_start=(16, 16), roi_end=(48, 48)), Flip(spatial_axis=1)])
    )
    ps = pool_coords(cs[None], (4, 4))[0].flatten(1).T  # (16, 2)
    pt = pool_coords(ct[None], (4, 4))[0].flatten(1).T
    dist = (ps[:, None] - pt[None]).square().sum(-1)
    nearest = dist.argmin(1)
    cells_s, cells_t = _cells(vs, 8), _cells(vt, 8)
    overlapping = [p for p in range(16) if any(cells_s[p] & cells_t[q] for q in range(16))]
    assert len(overlapping) == 4
    for p in range(16):
        if p in overlapping:
            assert cells_s[p] == cells_t[int(nearest[p])]
            assert float(dist[p, nearest[p]]) < 1e-10
        else:
            assert float(dist[p, nearest[p]]) > 1e-3


def test_coords_follow_resize_exactly_inside():
    """Crop rows/cols 8-39 of 64 and upsample x2: pixel r of the view shows original row 8 + (r + .5) / 2."""
    _, c = transform_with_coords(torch.rand(3, 64, 64), Compose([
        SpatialCrop(roi_start=(8, 8), roi_end=(40, 40)), Resize((64, 64), mode="bilinear")]))
    expected = (8 + (torch.arange(64) + 0.5) / 2) / 64  # pixel centres of the resampled grid
    torch.testing.assert_close(c[0, 1:-1, 5], expected[1:-1])  # borders are clamped by bilinear resampling
    torch.testing.assert_close(c[1, 7, 1:-1], expected[1:-1])


def test_random_views_track_image_content():
    """An image that *is* its coordinate map stays equal to the tracked coordinates after any views."""
    image = coordinate_grid(80, 60)
    t = LVMMedViewsd("image", size=32, zoom_prob=1.0, vflip_prob=0.5, num_local_crops=1, local_size=16,
                     **NO_INTENSITY)
    t.set_random_state(3)
    for _ in range(5):
        d = t({"image": image})
        for view in ("s", "t", "l0"):
            torch.testing.assert_close(d[f"image_{view}"], d[f"coords_{view}"], atol=1e-5, rtol=0)
            coords = d[f"coords_{view}"]
            assert coords.min() >= 0 and coords.max() <= 1
            # crop + resize + flip + zoom is affine per axis: constant steps away from the borders
            steps_y = coords[0, 2:-2, 4].diff()
            torch.testing.assert_close(steps_y, steps_y.mean().expand_as(steps_y), atol=1e-5, rtol=0)
            assert torch.allclose(coords[0, :, 3], coords[0, :, 9])  # y does not vary along a row
            assert torch.allclose(coords[1, 3], coords[1, 9])


def test_intensity_changes_image_not_coords_and_views_differ():
    t = LVMMedViewsd("image", size=32, crop_scale=(1.0, 1.0), hflip_prob=0.0, zoom_prob=0.0, jitter_prob=1.0,
                     noise_prob=1.0)
    t.set_random_state(0)
    img = torch.rand(1, 32, 32)
    d = t({"image": img})
    torch.testing.assert_close(d["coords_s"], coordinate_grid(32, 32))  # full crop, no flip: identity
    assert not torch.allclose(d["image_s"], img) and not torch.allclose(d["image_s"], d["image_t"])
    assert d["image_s"].min() >= 0 and d["image_s"].max() <= 1


def test_seeded_views_are_reproducible():
    img = torch.rand(1, 50, 40)
    a = LVMMedViewsd("image", size=24).set_random_state(5)({"image": img})
    b = LVMMedViewsd("image", size=24).set_random_state(5)({"image": img})
    c = LVMMedViewsd("image", size=24).set_random_state(6)({"image": img})
    for key in ("image_s", "image_t", "coords_s", "coords_t"):
        assert torch.equal(a[key], b[key])
    assert not torch.equal(a["coords_s"], c["coords_s"]) or not torch.equal(a["image_s"], c["image_s"])


def test_grey_images_replicated_to_encoder_channels_in_a_monai_pipeline():
    data = [{"image": torch.rand(1, 40 + 4 * i, 48)} for i in range(4)]  # different original sizes
    ds = Dataset(data, transform=Compose([LVMMedViewsd("image", size=32, out_channels=3)]))
    batch = next(iter(DataLoader(ds, batch_size=4, num_workers=0)))
    assert batch["image_s"].shape == (4, 3, 32, 32) and batch["coords_t"].shape == (4, 2, 32, 32)
    assert torch.equal(batch["image_s"][:, 0], batch["image_s"][:, 2])
    assert "image" not in batch
    kept = LVMMedViewsd("image", size=8, keep_original=True)({"image": torch.rand(1, 20, 20)})
    assert kept["image"].shape == (1, 20, 20)
    rgb = LVMMedViewsd("image", size=16)({"image": torch.rand(3, 20, 20)})
    assert rgb["image_s"].shape == (3, 16, 16)


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"2D channel-first"):
        LVMMedViewsd("image")({"image": torch.rand(1, 8, 8, 8)})
    with pytest.raises(ValueError, match="NaN"):
        LVMMedViewsd("image")({"image": torch.full((1, 8, 8), float("nan"))})
    with pytest.raises(ValueError, match="only 1-channel"):
        LVMMedViewsd("image", size=8, out_channels=3)({"image": torch.rand(2, 8, 8)})
    with pytest.raises(ValueError, match="crop scales"):
        LVMMedViewsd("image", crop_scale=(0.5, 1.2))
    with pytest.raises(ValueError, match=r"\(N, 2, H, W\)"):
        pool_coords(torch.rand(2, 3, 8, 8), (2, 2))



def test_share_random_state_reaches_nested_transforms_and_replays_from_the_seed():
    from monai.transforms import Lambdad, RandFlipd, RandGaussianNoised

    from lvmmed_monai.data.views import share_random_state

    def build() -> Compose:
        return Compose([RandFlipd("x", prob=0.5), Compose([RandGaussianNoised("x", prob=1.0)]),
                        Lambdad("x", lambda v: v * 2)])

    data = {"x": torch.rand(1, 8, 8)}
    t1, t2 = build(), build()
    outs = []
    for t in (t1, t2, t1):
        state = np.random.RandomState(7)
        share_random_state(t, state)
        noise = t.transforms[1].transforms[0]
        assert all(x.R is state for x in (t, t.transforms[0], t.transforms[1], noise, noise.rand_gaussian_noise))
        outs.append(t(dict(data))["x"])
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])  # same seed, same draws
    share_random_state(t1, np.random.RandomState(8))
    assert not torch.equal(t1(dict(data))["x"], outs[0])
