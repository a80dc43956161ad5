"""Slice-by-slice inference of 2D LVM-Med networks on 2D images and 3D volumes (the ``lvmmed_seg`` bundle).

:class:`SliceOrImageInferer` is a MONAI ``Inferer`` that takes either kind of input, so one evaluator (and one
data list) serves 2D images and 3D volumes: a 3D volume goes through MONAI's ``SliceInferer``, which cuts it
into 2D slices along ``slice_axis`` and runs the network on ``sw_batch_size`` slices per call (the batching is
where its speed over a Python loop of single slices comes from); a 2D image goes through MONAI's
``SlidingWindowInferer`` with the same in-plane window. MONAI's ``SliceInferer`` alone only takes 3D inputs,
hence this thin dispatch. Outputs keep the input's layout (and, for MONAI ``MetaTensor`` inputs, its
metadata: affine, spacing, file name), so predictions are saved without any inverse transform.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.inferers import Inferer, SliceInferer, SlidingWindowInferer

__all__ = ["SliceOrImageInferer"]


class SliceOrImageInferer(Inferer):
    """A 2D network on ``(B, C, H, W)`` images, or slice by slice on ``(B, C, X, Y, Z)`` volumes.

    Args:
        slice_axis: spatial axis of the volumes' slices (0, 1 or 2; 2 = axial for RAS NIfTI).
        sw_batch_size: slices (or windows) per network call.
        roi_size: in-plane window ``(h, w)``; -1 = the whole extent (default: whole slices, no windowing).
        overlap, mode: window overlap and blending (MONAI's ``SlidingWindowInferer``; matter only when the
            window is smaller than the slice).
        kwargs: other ``SlidingWindowInferer`` arguments (e.g. ``sw_device``, ``device`` to assemble large
            volumes on the CPU while the network runs on the GPU, ``progress``).
    """

    def __init__(self, slice_axis: int = 2, sw_batch_size: int = 4, roi_size: Sequence[int] = (-1, -1),
                 overlap: float = 0.25, mode: str = "constant", **kwargs: Any) -> None:
        super().__init__()
        if int(slice_axis) not in (0, 1, 2):
            raise ValueError(f"slice_axis must be 0, 1 or 2, got {slice_axis}")
        roi = [int(r) for r in roi_size]
        if len(roi) != 2:
            raise ValueError(f"roi_size is the in-plane window (h, w), got {list(roi_size)}")
        common = {"sw_batch_size": int(sw_batch_size), "overlap": overlap, "mode": mode, **kwargs}
        self.slice_inferer = SliceInferer(spatial_dim=int(slice_axis), roi_size=roi, **common)
        self.image_inferer = SlidingWindowInferer(roi_size=roi, **common)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        """``inputs`` ``(B, C, H, W)`` or ``(B, C, X, Y, Z)`` -> the network's outputs of the same spatial shape."""
        if inputs.ndim == 4:
            return self.image_inferer(inputs, network, *args, **kwargs)
        if inputs.ndim == 5:
            return self.slice_inferer(inputs, network, *args, **kwargs)
        raise ValueError(f"expected (B, C, H, W) images or (B, C, X, Y, Z) volumes, got shape {tuple(inputs.shape)}")
