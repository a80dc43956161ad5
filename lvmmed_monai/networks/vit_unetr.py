"""2D segmentation with the LVM-Med ViT-B encoder and a UNETR decoder built from MONAI's UNETR blocks."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from torch import nn

from lvmmed_monai.encoders.vit import LVMMedViTB
from lvmmed_monai.networks.padding import pad_to_multiple

__all__ = ["LVMMedViTUNETR"]


class LVMMedViTUNETR(nn.Module):
    """UNETR (Hatamizadeh et al. 2022) in 2D on the SAM-style ViT-B of LVM-Med.

    The official LVM-Med repository never shipped end-to-end ViT segmentation (the paper used TransUNet).
    MONAI's ``UNETR`` builds its own ViT, so it cannot take this encoder; we reuse its blocks and its
    wiring: skips from the input and from blocks 3, 6, 9 (indices 2, 5, 8: SAM's global-attention blocks),
    upsampled to strides 2, 4, 8. The bottleneck is SAM's neck on the last block (256 channels) rather
    than UNETR's raw last hidden state, so every pretrained encoder parameter is used and trained
    (no unused parameters under DDP).
    Inputs of any size are padded to a multiple of 16 and the logits cropped back. ``torch.jit.script``
    compiles it (the bundles' ``ckpt_export``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        img_size: int = 256,
        weights: str | os.PathLike | Mapping[str, Any] | None = None,
        strict: bool = True,
        feature_size: int = 32,
        norm_name: str | tuple = "instance",
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.encoder = LVMMedViTB(
            img_size=img_size,
            in_channels=in_channels,
            weights=weights,
            strict=strict,
            out_indices=(2, 5, 8, 11),
            drop_path_rate=drop_path_rate,
        )
        hidden, fs, sd = 768, feature_size, 2
        common = {"spatial_dims": sd, "norm_name": norm_name}
        self.encoder1 = UnetrBasicBlock(in_channels=in_channels, out_channels=fs, kernel_size=3, stride=1,
                                        res_block=True, **common)
        self.encoder2 = UnetrPrUpBlock(in_channels=hidden, out_channels=fs * 2, num_layer=2, kernel_size=3,
                                       stride=1, upsample_kernel_size=2, res_block=True, **common)
        self.encoder3 = UnetrPrUpBlock(in_channels=hidden, out_channels=fs * 4, num_layer=1, kernel_size=3,
                                       stride=1, upsample_kernel_size=2, res_block=True, **common)
        self.encoder4 = UnetrPrUpBlock(in_channels=hidden, out_channels=fs * 8, num_layer=0, kernel_size=3,
                                       stride=1, upsample_kernel_size=2, res_block=True, **common)
        self.decoder5 = UnetrUpBlock(in_channels=256, out_channels=fs * 8, kernel_size=3,
                                     upsample_kernel_size=2, res_block=True, **common)
        self.decoder4 = UnetrUpBlock(in_channels=fs * 8, out_channels=fs * 4, kernel_size=3,
                                     upsample_kernel_size=2, res_block=True, **common)
        self.decoder3 = UnetrUpBlock(in_channels=fs * 4, out_channels=fs * 2, kernel_size=3,
                                     upsample_kernel_size=2, res_block=True, **common)
        self.decoder2 = UnetrUpBlock(in_channels=fs * 2, out_channels=fs, kernel_size=3,
                                     upsample_kernel_size=2, res_block=True, **common)
        self.out = UnetOutBlock(spatial_dims=sd, in_channels=fs, out_channels=out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2], x.shape[-1]
        x = pad_to_multiple(x, 16)
        neck, blocks = self.encoder.intermediates(x)
        z3, z6, z9 = blocks[0], blocks[1], blocks[2]
        enc1 = self.encoder1(x)
        dec3 = self.decoder5(neck, self.encoder4(z9))
        dec2 = self.decoder4(dec3, self.encoder3(z6))
        dec1 = self.decoder3(dec2, self.encoder2(z3))
        out = self.decoder2(dec1, enc1)
        return self.out(out)[..., :h, :w]
