"""LVM-Med ResNet-50 U-Net with deep-supervision outputs at arbitrary scales (for nnU-Net)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.nets.flexible_unet import UNetDecoder
from torch import nn

from lvmmed_monai.encoders.resnet import LVMMedResNet50
from lvmmed_monai.networks.padding import pad_to_multiple

__all__ = ["LVMMedDeepSupervisionUNet", "deep_supervision_scales"]


def deep_supervision_scales(pool_op_kernel_sizes: Sequence[Sequence[int]]) -> list[list[float]]:
    """nnU-Net's scales for a plan: ``1 / cumprod(pool_op_kernel_sizes)`` without the coarsest level."""
    scales, acc = [], [1.0] * len(pool_op_kernel_sizes[0])
    for kernel in pool_op_kernel_sizes:
        acc = [a * k for a, k in zip(acc, kernel, strict=True)]
        scales.append([1.0 / a for a in acc])
    return scales[:-1]


class _DeepSupervisionDecoder(UNetDecoder):
    """MONAI's FlexibleUNet decoder that also returns every stage, for nnU-Net's deep supervision.

    ``UNetDecoder.forward`` only returns the last stage; this keeps its blocks and weights and yields the
    stage outputs at strides 16, 8, 4, 2, 1. ``deep_supervision`` is the attribute nnU-Net's
    ``set_deep_supervision_enabled`` switches.
    """

    deep_supervision: bool = True

    def forward_stages(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        skips = features[:-1][::-1]
        x, outs = features[-1], []
        for i, block in enumerate(self.blocks):
            x = block(x, skips[i] if i < len(skips) else None)
            outs.append(x)
        return outs


class LVMMedDeepSupervisionUNet(nn.Module):
    """LVM-Med ResNet-50 encoder + FlexibleUNet decoder + a 1x1 head per decoder stage.

    With ``decoder.deep_supervision`` on, ``forward`` returns a list of logits, highest resolution first,
    one per entry of ``ds_scales`` (nnU-Net's per-axis scales, see :func:`deep_supervision_scales`), each of
    size ``round(input_size * scale)`` as nnU-Net downsamples its targets. Each comes from the decoder stage
    whose stride is the largest power of two not above ``1 / scale`` (axis-wise minimum), cropped, and
    interpolated only where the plan asks for a size that stage does not have (anisotropic pooling,
    scales coarser than stride 16). Off, it returns the full-resolution logits only. The heads exist in
    both modes, so the state dict does not depend on the flag.

    Inputs whose size the encoder's stride 32 does not divide are padded at the end to a multiple of 32
    and every output cropped back, so any nnU-Net patch size works.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        ds_scales: Sequence[Sequence[float]] | None = None,
        weights: str | os.PathLike | Mapping[str, Any] | None = None,
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
        deep_supervision: bool = True,
        strict: bool = True,
    ) -> None:
        super().__init__()
        if len(decoder_channels) != 5:
            raise ValueError(f"decoder_channels needs 5 entries (one per encoder stage), got {decoder_channels}")
        self.encoder = LVMMedResNet50(in_channels=in_channels, weights=weights, strict=strict)
        self.decoder = _DeepSupervisionDecoder(
            spatial_dims=2,
            encoder_channels=(in_channels, *LVMMedResNet50.num_channels_per_output()[0]),
            decoder_channels=tuple(decoder_channels),
            act=("relu", {"inplace": True}),
            norm=("batch", {"eps": 1e-3, "momentum": 0.1}),
            dropout=0.0,
            bias=False,
            upsample="nontrainable",
            pre_conv="default",
            interp_mode="nearest",
            align_corners=None,
            is_pad=True,
        )
        self.decoder.deep_supervision = deep_supervision
        self.ds_scales = [list(map(float, s)) for s in (ds_scales or [[1.0, 1.0]])]
        if any(len(s) != 2 or min(s) <= 0 for s in self.ds_scales):
            raise ValueError(f"ds_scales must be positive (y, x) pairs, got {self.ds_scales}")
        # a 1x1 head for each decoder stage a scale reads (finest first: strides 1, 2, 4, 8, 16), and always
        # the full-resolution one; no head is left without a gradient (DDP) and none depends on the flag
        stage_channels = list(reversed(tuple(decoder_channels)))
        self.levels = [self._level(s) for s in self.ds_scales]
        self.heads = nn.ModuleDict(
            {str(lv): nn.Conv2d(stage_channels[lv], out_channels, 1) for lv in sorted({0, *self.levels})}
        )

    @staticmethod
    def _level(scale: Sequence[float]) -> int:
        """The decoder stage for a scale: the largest stride 2**k (k <= 4) not above 1 / max(scale)."""
        return max(0, min(int(math.floor(math.log2(1.0 / max(scale)) + 1e-6)), 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        h, w = x.shape[-2:]
        stride = LVMMedResNet50.feature_stride
        stages = self.decoder.forward_stages(self.encoder(pad_to_multiple(x, stride)))
        stages = stages[::-1]  # finest first: stride 1, 2, 4, 8, 16
        if not self.decoder.deep_supervision:
            return self.heads["0"](stages[0])[..., :h, :w]
        outputs = []
        for scale, level in zip(self.ds_scales, self.levels, strict=True):
            size = [round(h * scale[0]), round(w * scale[1])]
            logits = self.heads[str(level)](stages[level])
            logits = logits[..., : math.ceil(h / 2**level), : math.ceil(w / 2**level)]
            if list(logits.shape[-2:]) != size:
                logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            outputs.append(logits)
        return outputs
