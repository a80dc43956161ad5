"""2D U-Net with the LVM-Med ResNet-50 encoder: MONAI's FlexibleUNet with weights passed explicitly."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from monai.networks.nets import FlexibleUNet

from lvmmed_monai.encoders.resnet import LVMMedResNet50
from lvmmed_monai.networks.padding import pad_to_multiple

__all__ = ["LVMMedFlexibleUNet"]


class LVMMedFlexibleUNet(FlexibleUNet):
    """``FlexibleUNet(backbone="lvmmed_resnet50")`` plus an explicit ``weights`` argument for the encoder.

    ``FlexibleUNet(in_channels, out_channels, backbone="lvmmed_resnet50")`` works as well once
    ``lvmmed_monai`` is imported; FlexibleUNet's ``pretrained`` is a bool with no way to name a file, so this
    subclass takes the file and loads it into ``self.encoder`` (report in ``self.encoder.load_report``).
    Any H, W work here: the input is padded to a multiple of the encoder's stride 32 and the logits
    cropped back (plain FlexibleUNet's ``is_pad`` only pads decoder features, which fails when a size
    rounds up, e.g. 70 -> 35 -> 18 -> 9 -> 5 -> 3 -> 6 != 5). ``torch.jit.script`` compiles it (the bundles'
    ``ckpt_export``): ``forward`` spells out FlexibleUNet's encoder -> decoder -> head, as TorchScript has no
    ``super()``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        weights: str | os.PathLike | Mapping[str, Any] | None = None,
        strict: bool = True,
        decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16),
        **kwargs: Any,
    ) -> None:
        for key in ("backbone", "spatial_dims", "pretrained"):
            if key in kwargs:
                raise TypeError(f"LVMMedFlexibleUNet fixes `{key}`; pass `weights=` for pretrained encoders")
        super().__init__(
            in_channels=in_channels,
            out_channels=out_channels,
            backbone="lvmmed_resnet50",
            spatial_dims=2,
            decoder_channels=decoder_channels,
            **kwargs,
        )
        self.encoder: LVMMedResNet50
        self.stride: int = LVMMedResNet50.feature_stride
        if weights is not None:
            self.encoder.load_weights(weights, strict=strict)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        h, w = inputs.shape[-2], inputs.shape[-1]
        features = self.encoder(pad_to_multiple(inputs, self.stride))
        return self.segmentation_head(self.decoder(features, self.skip_connect))[..., :h, :w]
