"""2D segmentation and classification networks by encoder name, for configs that switch encoders with one key."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from lvmmed_monai.encoders import ENCODERS
from lvmmed_monai.networks.classifier import LVMMedClassifier
from lvmmed_monai.networks.unet import LVMMedFlexibleUNet
from lvmmed_monai.networks.vit_unetr import LVMMedViTUNETR
from lvmmed_monai.registry import Registry

__all__ = ["SEGMENTATION_NETS_2D", "segmentation_net_2d", "classification_net_2d"]

SEGMENTATION_NETS_2D = Registry("2D segmentation network", {
    "lvmmed_resnet50": LVMMedFlexibleUNet,  # MONAI FlexibleUNet decoder
    "lvmmed_vit_b": LVMMedViTUNETR,  # UNETR decoder from MONAI's blocks
})


def segmentation_net_2d(encoder: str, in_channels: int, out_channels: int,
                        weights: str | os.PathLike | Mapping[str, Any] | None = None, strict: bool = True,
                        **kwargs: Any) -> nn.Module:
    """The 2D segmentation network of ``encoder`` (:data:`SEGMENTATION_NETS_2D`): ``(B, in_channels, H, W)`` ->
    logits ``(B, out_channels, H, W)`` for any H, W; ``weights``: the encoder's LVM-Med weights (None = random
    initialisation). Extra ``kwargs`` go to the network (e.g. ``img_size``, ``feature_size`` for the ViT,
    ``decoder_channels`` for the U-Net)."""
    return SEGMENTATION_NETS_2D.get_or_raise(encoder)(in_channels=int(in_channels), out_channels=int(out_channels),
                                                      weights=weights, strict=strict, **kwargs)


def classification_net_2d(encoder: str, in_channels: int, num_classes: int,
                          weights: str | os.PathLike | Mapping[str, Any] | None = None, image_size: int = 224,
                          linear_probe: bool = False, hidden_dims: Sequence[int] = (), dropout: float = 0.0,
                          strict: bool = True, **kwargs: Any) -> LVMMedClassifier:
    """:class:`~lvmmed_monai.networks.LVMMedClassifier` on ``encoder`` (``lvmmed_resnet50`` or ``lvmmed_vit_b``):
    ``(B, in_channels, image_size, image_size)`` -> logits ``(B, num_classes)``. ``linear_probe``: the encoder
    frozen (no gradient, eval mode), only the head trains; else full fine-tuning. The ViT's position tables
    are sized for ``image_size`` (a multiple of 16); the ResNet-50 takes any size. Extra ``kwargs`` go to the
    encoder."""
    if ENCODERS.get_or_raise(encoder).sized_by_image:
        kwargs.setdefault("img_size", int(image_size))
    return LVMMedClassifier(int(num_classes), encoder=encoder, weights=weights, in_channels=int(in_channels),
                            freeze_encoder=bool(linear_probe), hidden_dims=[int(h) for h in hidden_dims],
                            dropout=float(dropout), strict=strict, **kwargs)
