"""LVM-Med ViT-B: the SAM image encoder, built on timm's ``VisionTransformerSAM``."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from timm.models.vision_transformer_sam import VisionTransformerSAM
from torch import nn

from lvmmed_monai.weights import LoadReport, LoadsWeights

__all__ = ["LVMMedViTB", "SAM_PIXEL_MEAN", "SAM_PIXEL_STD"]

# SAM (and LVM-Med's ViT) normalise 0..255 RGB with these; for [0, 1] inputs divide both by 255.
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


class LVMMedViTB(VisionTransformerSAM, LoadsWeights):
    """ViT-B/16 SAM image encoder (embed 768, depth 12, 12 heads, window 14, global blocks 2, 5, 8, 11).

    timm's ``samvit_base_patch16`` is the same network as SAM's ``ImageEncoderViT``; the official
    ``lvmmed_vit.pth`` (SAM keys) is converted to timm keys on load, and ``pos_embed`` and the global
    blocks' relative-position tables are resized to ``img_size`` (any multiple of 16). At run time
    timm also resamples both for inputs of another size, so ``img_size`` only sets the stored tables.

    Outputs: ``forward`` = SAM's neck, ``(N, 256, H/16, W/16)``; :meth:`feature_map` = the last block,
    ``(N, 768, H/16, W/16)`` (LVM-Med's SSL and classifiers pool it); :meth:`intermediates` = the blocks in
    ``out_indices`` for UNETR-style decoders. Inputs: RGB normalised with :data:`SAM_PIXEL_MEAN` /
    :data:`SAM_PIXEL_STD` (on a 0..255 scale); ``in_channels=1`` sums the patch-embedding kernels over RGB.
    ``torch.jit.script`` compiles it (``forward``, :meth:`intermediates`, :meth:`feature_map`).
    ``strict`` and ``check_finite`` (refuse NaN/Inf tensors) apply to ``weights`` as in
    :func:`~lvmmed_monai.weights.load_weights`.
    """

    weights_layout = "timm_samvit_b"
    first_conv_key = "patch_embed.proj.weight"
    # the encoder's facts, read by every other module (one home per encoder, as timm's per-model config)
    feature_dim = 768
    feature_stride = 16
    # for inputs in [0, 1]: SAM's pixel statistics, given on the 0-255 scale
    input_mean = tuple(m / 255 for m in SAM_PIXEL_MEAN)
    input_std = tuple(s / 255 for s in SAM_PIXEL_STD)
    pretrain_normalization = {"scheme": "sam", "input_range": [0.0, 255.0], "mean": list(SAM_PIXEL_MEAN),
                              "std": list(SAM_PIXEL_STD)}
    level_channels = (768, 768, 768, 768, 256)  # level_maps(): the blocks of out_indices, then SAM's neck
    level_strides = (16, 16, 16, 16, 16)
    last_block_level = 3  # the last transformer block (the neck comes after it)
    sized_by_image = True  # img_size sets the position tables (a multiple of 16)

    def __init__(
        self,
        img_size: int = 1024,
        in_channels: int = 3,
        weights: str | os.PathLike | Mapping[str, Any] | None = None,
        out_indices: Sequence[int] = (2, 5, 8, 11),
        drop_path_rate: float = 0.0,
        strict: bool = True,
        check_finite: bool = True,
    ) -> None:
        if img_size % 16 or img_size < 16:
            raise ValueError(f"img_size must be a positive multiple of the patch size 16, got {img_size}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        super().__init__(
            img_size=img_size,
            patch_size=16,
            in_chans=in_channels,
            embed_dim=768,
            depth=12,
            num_heads=12,
            global_attn_indexes=(2, 5, 8, 11),
            window_size=14,
            use_rel_pos=True,
            num_classes=0,
            drop_path_rate=drop_path_rate,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),  # SAM's eps; timm's default (1e-5) differs slightly
        )
        bad = [i for i in out_indices if not 0 <= i < 12]
        if bad:
            raise ValueError(f"out_indices must be block indices in 0..11, got {list(out_indices)}")
        self.out_indices = tuple(out_indices)
        self.load_report: LoadReport | None = None
        if weights is not None:
            self.load_weights(weights, strict=strict, check_finite=check_finite)


    def _check(self, x: torch.Tensor) -> None:
        channels: int = self.patch_embed.proj.in_channels
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"expected (N, {channels}, H, W) input, got ({', '.join([str(s) for s in x.shape])})")
        if x.shape[-1] % 16 or x.shape[-2] % 16:
            raise ValueError(f"H and W must be multiples of 16 for ViT-B/16, got ({x.shape[-2]}, {x.shape[-1]})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return self.forward_features(x)

    # timm's forward_intermediates returns a Union; the isinstance checks narrow it for torch.jit.script

    def intermediates(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Return ``(neck (N, 256, h, w), [block outputs (N, 768, h, w) for out_indices])``."""
        self._check(x)
        out = self.forward_intermediates(x, indices=list(self.out_indices))
        if not isinstance(out, tuple):
            raise RuntimeError("timm's forward_intermediates returned no neck output")
        return out[0], out[1]

    def level_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The maps of :attr:`level_channels`: the blocks of ``out_indices``, then SAM's neck."""
        neck, blocks = self.intermediates(x)
        return [*blocks, neck]

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Last transformer block, ``(N, 768, H/16, W/16)``."""
        self._check(x)
        out = self.forward_intermediates(x, indices=[11], intermediates_only=True)
        if isinstance(out, tuple):
            raise RuntimeError("timm's forward_intermediates returned more than the intermediates")
        return out[0]
