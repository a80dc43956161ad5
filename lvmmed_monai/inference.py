"""Slice-by-slice inference of 2D LVM-Med networks on 2D images and 3D volumes (the ``lvmmed_seg`` and
``lvmmed_sam`` bundles).

:class:`SliceOrImageInferer` is a MONAI ``Inferer`` that takes either kind of input, so one evaluator (and one
data list) serves 2D images and 3D volumes: a 3D volume goes through MONAI's ``SliceInferer``, which cuts it
into 2D slices along ``slice_axis`` and runs the network on ``sw_batch_size`` slices per call (the batching is
where its speed over a Python loop of single slices comes from); a 2D image goes through MONAI's
``SlidingWindowInferer`` with the same in-plane window. MONAI's ``SliceInferer`` alone only takes 3D inputs,
hence this thin dispatch. Outputs keep the input's layout (and, for MONAI ``MetaTensor`` inputs, its
metadata: affine, spacing, file name), so predictions are saved without any inverse transform.

:class:`BoxPromptInferer` does the same for box-prompted networks (:class:`~lvmmed_monai.networks.LVMMedSAM`):
each slice that has boxes is embedded once, its boxes are decoded in batches, and the masks are assembled
into per-class scores with the input's layout. MONAI's inferers pass the same extra arguments to every
window; here each slice has its own boxes, hence a separate class.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.inferers import Inferer, SliceInferer, SlidingWindowInferer
from monai.utils import convert_to_dst_type

__all__ = ["SliceOrImageInferer", "BoxPromptInferer"]


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


class BoxPromptInferer(Inferer):
    """Box-prompted segmentation of ``(1, C, H, W)`` images or ``(1, C, X, Y, Z)`` volumes, slice by slice.

    ``inferer(inputs, network, boxes)``: ``boxes`` is a box table ``(K, 6)`` (or ``(1, K, 6)`` from a data
    loader) with the columns of :data:`lvmmed_monai.data.boxes.BOX_COLUMNS` (slice, label, x0, y0, x1, y1 in
    the input's pixels). Each slice holding boxes is resized to the network's ``img_size`` (bilinear, as
    MedSAM), embedded once (``network.encode``, ``sw_batch_size`` slices per call), and its boxes decoded
    (``network.decode``, ``box_batch_size`` per call); the masks are resized back and reduced per class by
    the maximum logit. Output: ``(1, num_classes, ...)`` scores of the input's spatial shape (and metadata),
    background 0 and a class ``fill`` where it has no box, so ``argmax`` labels a pixel with the box class
    of highest logit where that logit is positive.
    """

    def __init__(self, num_classes: int, slice_axis: int = 2, sw_batch_size: int = 4, box_batch_size: int = 32,
                 fill: float = -1e4) -> None:
        super().__init__()
        if int(slice_axis) not in (0, 1, 2):
            raise ValueError(f"slice_axis must be 0, 1 or 2, got {slice_axis}")
        if int(num_classes) < 2:
            raise ValueError(f"num_classes counts the background too and must be >= 2, got {num_classes}")
        self.num_classes, self.slice_axis = int(num_classes), int(slice_axis)
        self.sw_batch_size, self.box_batch_size, self.fill = int(sw_batch_size), int(box_batch_size), float(fill)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], boxes: torch.Tensor,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        if not all(hasattr(network, a) for a in ("encode", "decode", "img_size")):
            raise TypeError(f"BoxPromptInferer needs a box-prompted network with encode / decode / img_size "
                            f"(lvmmed_monai.networks.LVMMedSAM), got {type(network).__name__}")
        if inputs.ndim not in (4, 5) or inputs.shape[0] != 1:
            raise ValueError(f"expected one (1, C, H, W) image or (1, C, X, Y, Z) volume (each has its own boxes: "
                             f"batch_size 1), got shape {tuple(inputs.shape)}")
        table = torch.as_tensor(boxes).reshape(-1, 6).to(inputs.device, torch.float32)
        x = torch.as_tensor(inputs)[0]
        x = x[..., None] if inputs.ndim == 4 else torch.movedim(x, 1 + self.slice_axis, -1)  # (C, H, W, D)
        _, h, w, depth = x.shape
        if len(table) and (table[:, 1].min() < 1 or table[:, 1].max() >= self.num_classes
                           or table[:, 0].min() < 0 or table[:, 0].max() >= depth):
            raise ValueError(f"boxes need labels in 1..{self.num_classes - 1} and slices in 0..{depth - 1}; got "
                             f"labels {table[:, 1].unique().tolist()}, slices {table[:, 0].min().item():g}.."
                             f"{table[:, 0].max().item():g}")
        size = int(network.img_size)
        scale = table.new_tensor([size / w, size / h, size / w, size / h])
        scores = torch.full((self.num_classes * depth, h * w), self.fill, device=inputs.device)
        scores[:depth] = 0.0  # background
        slices = table[:, 0].long()
        for chunk in slices.unique().split(self.sw_batch_size):
            images = x[..., chunk].permute(3, 0, 1, 2)
            if (h, w) != (size, size):
                images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
            embeddings = network.encode(images)
            rows = torch.nonzero(torch.isin(slices, chunk)).flatten()
            where = torch.searchsorted(chunk, slices)  # the embedding of each box's slice
            for part in rows.split(self.box_batch_size):
                logits = network.decode(embeddings[where[part]], table[part, 2:] * scale)
                if (h, w) != (size, size):
                    logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
                index = (table[part, 1].long() * depth + slices[part])[:, None].expand(-1, h * w)
                scores.scatter_reduce_(0, index, logits.reshape(len(part), -1).float(), "amax")
        out = scores.reshape(self.num_classes, depth, h, w).permute(0, 2, 3, 1)
        out = out[..., 0] if inputs.ndim == 4 else torch.movedim(out, -1, 1 + self.slice_axis)
        return convert_to_dst_type(out[None], inputs, dtype=torch.float32)[0]
