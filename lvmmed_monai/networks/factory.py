"""2D segmentation networks by encoder name, for configs that switch encoders with one key."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torch import nn

from lvmmed_monai.networks.unet import LVMMedFlexibleUNet
from lvmmed_monai.networks.vit_unetr import LVMMedViTUNETR

__all__ = ["SEGMENTATION_NETS_2D", "segmentation_net_2d"]

SEGMENTATION_NETS_2D: dict[str, type[nn.Module]] = {
    "lvmmed_resnet50": LVMMedFlexibleUNet,  # MONAI FlexibleUNet decoder
    "lvmmed_vit_b": LVMMedViTUNETR,  # UNETR decoder from MONAI's blocks
}


def segmentation_net_2d(encoder: str, in_channels: int, out_channels: int,
                        weights: str | os.PathLike | Mapping[str, Any] | None = None, strict: bool = True,
                        **kwargs: Any) -> nn.Module:
    """The 2D segmentation network of ``encoder`` (:data:`SEGMENTATION_NETS_2D`): ``(B, in_channels, H, W)`` ->
    logits ``(B, out_channels, H, W)`` for any H, W; ``weights``: the encoder's LVM-Med weights (None = random
    initialisation). Extra ``kwargs`` go to the network (e.g. ``img_size``, ``feature_size`` for the ViT,
    ``decoder_channels`` for the U-Net)."""
    if encoder not in SEGMENTATION_NETS_2D:
        raise ValueError(f"unknown encoder {encoder!r} for a 2D segmentation network; valid: "
                         f"{sorted(SEGMENTATION_NETS_2D)}")
    return SEGMENTATION_NETS_2D[encoder](in_channels=int(in_channels), out_channels=int(out_channels),
                                         weights=weights, strict=strict, **kwargs)
