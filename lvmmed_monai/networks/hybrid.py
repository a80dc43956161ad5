"""2D-3D hybrid networks (Joint 2D-3D SSL): an LVM-Med 2D encoder per slice (f_intra) + deformable attention
across slices (f_inter), for 3D segmentation and 3D classification of ``(B, C, D, H, W)`` volumes.

* f_intra: ``lvmmed_resnet50`` (levels at strides 2..32: 64, 256, 512, 1024, 2048 channels) or
  ``lvmmed_vit_b`` (blocks 3, 6, 9, 12: 768 channels; neck: 256) on every slice, ``slice_chunk`` slices at a
  time. Each level is average-pooled and concatenated: the slice embedding ``Y_i`` of Eq. 9 (the paper
  concatenates the five ResNet-50 blocks).
* f_inter: :class:`~lvmmed_monai.networks.inter_slice.InterSliceTransformer`, four pyramid blocks.
* Segmentation: the 2D network of the encoder (MONAI FlexibleUNet decoder, its deep-supervision variant,
  or the ViT UNETR decoder) decodes every slice; block ``i``'s output for that slice, through a linear
  map initialised to zero, is added as a per-channel shift to the encoder level the decoder reads at
  that depth (ResNet-50: strides 4, 8, 16, 32; ViT: blocks 3, 6, 9 and the neck). Slices are stacked back
  into a ``(B, out, D, H, W)`` volume of the input's size.
* Classification: two FC layers on the masked mean over slices of f_inter's last output (the paper's head).

Volumes of different depths share a batch through ``lengths`` (padding at the end of the slice axis):
padded slices are never encoded; their logits are zero.

**A one-slice volume** (``D = 1``) gives exactly the 2D network, shifted by the slice's own context: every
attention layer then has one key, the slice itself (reference grid of one point; offsets clamp to it;
softmax over one key is 1), so f_inter is a fixed per-slice map (attention reduces to ``W_O W_v LN(x)``,
plus the MLPs and norms) and no other slice can enter. The segmentation output is the 2D decoder
(``net.decode``) on the slice's encoder levels (``net.level_features``), each shifted by the context map of
f_inter's output for that slice alone, cropped to the input's H, W; with the context maps at zero
(their initial value, e.g. a fresh network or ``LVMMedHybridSegNet(..., weights=2D weights)``) it equals
``net2d(x[:, :, 0])`` exactly, for any ``D`` (tests check both).

Memory: ``slice_chunk`` bounds what f_intra holds at once. Without gradients (inference), when the volume
has more slices than one chunk, segmentation runs two passes (embeddings first, then encoder + decoder per
chunk again), so memory stays at one chunk's feature maps plus ``D`` embeddings. With gradients, autograd
keeps every chunk's activations anyway, so one pass is made. In training, BatchNorm sees one chunk's slices.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lvmmed_monai.encoders import load_encoder
from lvmmed_monai.networks.ds_unet import LVMMedDeepSupervisionUNet
from lvmmed_monai.networks.factory import SEGMENTATION_NETS_2D
from lvmmed_monai.networks.inter_slice import InterSliceTransformer
from lvmmed_monai.networks.slice_encoding import (
    CONTEXT_LEVELS,
    SliceEmbeddings,
    SliceEncoderBase,
    Weights,
    gather_rows,
    scatter_rows,
)
from lvmmed_monai.networks.unet import LVMMedFlexibleUNet
from lvmmed_monai.networks.vit_unetr import LVMMedViTUNETR

__all__ = ["LVMMedHybridBackbone", "LVMMedHybridClassifier", "LVMMedHybridSegNet", "SliceEmbeddings",
           "CONTEXT_LEVELS"]


class LVMMedHybridBackbone(SliceEncoderBase):
    """f_intra + f_inter: ``forward(x, lengths)`` -> f_inter's four per-slice outputs ``(B, D, dims[i])``.

    What the joint 2D-3D SSL tasks (:mod:`lvmmed_monai.ssl.joint3d`) and the classifier build on.

    Args:
        encoder: "lvmmed_resnet50" or "lvmmed_vit_b". weights: the encoder's LVM-Med weights (None = random).
        in_channels: channels ``C`` of the volumes. slice_chunk: slices per f_intra call (None = all).
        inter_kwargs: arguments of :class:`~lvmmed_monai.networks.inter_slice.InterSliceTransformer`.
        multi_feature: the slice embedding concatenates the pooled levels of every block (Eq. 9, default) or
            takes the last block's alone (False: the "w/o multi-feature" ablation).
        encoder_kwargs: extra encoder arguments (e.g. ``img_size`` for the ViT).
    """

    def __init__(self, encoder: str = "lvmmed_resnet50", weights: Weights = None, in_channels: int = 1,
                 slice_chunk: int | None = 32, inter_kwargs: Mapping[str, Any] | None = None,
                 strict: bool = True, multi_feature: bool = True, **encoder_kwargs: Any) -> None:
        super().__init__()
        self._spec(encoder)
        self.encoder_name, self.in_channels, self.slice_chunk = encoder, in_channels, slice_chunk
        self.multi_feature = bool(multi_feature)
        self.encoder = load_encoder(encoder, weights=weights, in_channels=in_channels, strict=strict,
                                    **encoder_kwargs)
        self.inter = InterSliceTransformer(self.embed_dim, **dict(inter_kwargs or {}))

    @property
    def f_intra(self) -> nn.Module:
        return self.encoder

    def forward(self, x: Tensor, lengths: Tensor | Sequence[int] | None = None) -> list[Tensor]:
        emb = self.slice_embeddings(x, lengths)
        return self.inter(emb.y, emb.key_padding_mask)


class LVMMedHybridClassifier(LVMMedHybridBackbone):
    """3D classification: f_intra + f_inter, mean over real slices, then two FC layers (as in the paper).

    ``forward(x (B, C, D, H, W), lengths=None)`` -> logits ``(B, num_classes)``.
    """

    def __init__(self, num_classes: int, encoder: str = "lvmmed_resnet50", weights: Weights = None,
                 in_channels: int = 1, hidden_dim: int = 512, dropout: float = 0.0, slice_chunk: int | None = 32,
                 inter_kwargs: Mapping[str, Any] | None = None, strict: bool = True, multi_feature: bool = True,
                 **encoder_kwargs: Any) -> None:
        super().__init__(encoder, weights, in_channels, slice_chunk, inter_kwargs, strict, multi_feature,
                         **encoder_kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.head = nn.Sequential(nn.Linear(self.inter.out_dim, hidden_dim), nn.ReLU(inplace=True),
                                  nn.Dropout(dropout), nn.Linear(hidden_dim, num_classes))

    def forward(self, x: Tensor, lengths: Tensor | Sequence[int] | None = None) -> Tensor:  # type: ignore[override]
        emb = self.slice_embeddings(x, lengths)
        h = self.inter(emb.y, emb.key_padding_mask)[-1]
        return self.head(self.volume_embedding(h, emb.key_padding_mask))


class LVMMedHybridSegNet(SliceEncoderBase):
    """3D segmentation: 2D LVM-Med U-Net per slice, fed with f_inter's context (see the module docstring).

    ``forward(x (B, C, D, H, W), lengths=None)`` -> logits ``(B, out_channels, D, H, W)``; with ``ds_scales``
    and deep supervision on, a list of logits at nnU-Net's 3D scales ``(z, y, x)`` (highest resolution first;
    in-plane from the 2D decoder's stages, along z linearly resampled when a scale is below 1).

    Args:
        in_channels / out_channels: volume channels and classes.
        encoder: "lvmmed_resnet50" (MONAI FlexibleUNet decoder; with ``ds_scales`` the deep-supervision U-Net)
            or "lvmmed_vit_b" (UNETR decoder, no deep supervision).
        weights: the encoder's LVM-Med weights. slice_chunk: slices per 2D call (None = all at once).
        ds_scales: nnU-Net's per-axis ``(z, y, x)`` scales (``deep_supervision_scales`` of a 3d plan).
        deep_supervision: the flag nnU-Net switches (``net2d.decoder.deep_supervision``).
        inter_kwargs: arguments of :class:`~lvmmed_monai.networks.inter_slice.InterSliceTransformer`.
        net2d_kwargs: extra arguments of the 2D network (e.g. ``img_size``, ``decoder_channels``).
        multi_feature: as for :class:`LVMMedHybridBackbone` (the same value as the pretrained backbone's).
    """

    def __init__(self, in_channels: int, out_channels: int, encoder: str = "lvmmed_resnet50", weights: Weights = None,
                 slice_chunk: int | None = 32, ds_scales: Sequence[Sequence[float]] | None = None,
                 deep_supervision: bool = True, inter_kwargs: Mapping[str, Any] | None = None,
                 strict: bool = True, net2d_kwargs: Mapping[str, Any] | None = None,
                 multi_feature: bool = True) -> None:
        super().__init__()
        spec = self._spec(encoder)
        self.encoder_name, self.in_channels, self.slice_chunk = encoder, in_channels, slice_chunk
        self.multi_feature = bool(multi_feature)
        kw = dict(net2d_kwargs or {}, in_channels=in_channels, out_channels=out_channels, weights=weights,
                  strict=strict)
        self.ds_scales = None if ds_scales is None else [list(map(float, s)) for s in ds_scales]
        if self.ds_scales is not None and any(len(s) != 3 or min(s) <= 0 for s in self.ds_scales):
            raise ValueError(f"ds_scales must be positive (z, y, x) triples, got {self.ds_scales}")
        net_cls = SEGMENTATION_NETS_2D.get_or_raise(encoder)
        if ds_scales is None:
            self.net2d: nn.Module = net_cls(**kw)
        elif net_cls is LVMMedFlexibleUNet:  # the deep-supervision U-Net is its FlexibleUNet with more heads
            self.net2d = LVMMedDeepSupervisionUNet(ds_scales=[s[1:] for s in self.ds_scales],
                                                   deep_supervision=deep_supervision, **kw)
        else:
            raise ValueError(f"the {net_cls.__name__} decoder of {encoder} has one output: build it without "
                             "ds_scales")
        self.inter = InterSliceTransformer(self.embed_dim, **dict(inter_kwargs or {}))
        self.context_levels = tuple(spec["context"])
        self.context = nn.ModuleList(
            nn.Linear(dim, spec["channels"][lv]) for dim, lv in zip(self.inter.dims, self.context_levels, strict=True)
        )
        for proj in self.context:  # start as the 2D network: the context is learned from zero
            nn.init.zeros_(proj.weight)
            nn.init.zeros_(proj.bias)

    @property
    def f_intra(self) -> nn.Module:
        return self.net2d.encoder

    @property
    def encoder(self) -> nn.Module:
        """The pretrained LVM-Med encoder (f_intra), under the name the fine-tuning tools use."""
        return self.net2d.encoder

    @property
    def decoder(self) -> nn.Module:
        """The 2D decoder; for the deep-supervision U-Net its ``deep_supervision`` flag is nnU-Net's switch."""
        return self.net2d.decoder

    @property
    def deep_supervision(self) -> bool:
        return isinstance(self.net2d, LVMMedDeepSupervisionUNet) and self.net2d.decoder.deep_supervision

    def decode(self, levels: list[Tensor], slices: Tensor) -> list[Tensor]:
        """The 2D network's decoder on (context-shifted) levels of padded slices -> list of logits."""
        net = self.net2d
        if isinstance(net, LVMMedViTUNETR):
            z3, z6, z9, _, neck = levels
            dec3 = net.decoder5(neck, net.encoder4(z9))
            dec1 = net.decoder3(net.decoder4(dec3, net.encoder3(z6)), net.encoder2(z3))
            return [net.out(net.decoder2(dec1, net.encoder1(slices)))]
        if isinstance(net, LVMMedFlexibleUNet):
            return [net.segmentation_head(net.decoder(levels, net.skip_connect))]
        stages = net.decoder.forward_stages(levels)[::-1]  # LVMMedDeepSupervisionUNet, finest first
        if not net.decoder.deep_supervision:
            return [net.heads["0"](stages[0])]
        return [net.heads[str(lv)](stages[lv]) for lv in net.levels]

    def _shift(self, levels: list[Tensor], contexts: list[Tensor]) -> list[Tensor]:
        levels = list(levels)
        for proj, lv, ctx in zip(self.context, self.context_levels, contexts, strict=True):
            levels[lv] = levels[lv] + proj(ctx)[:, :, None, None].to(levels[lv].dtype)
        return levels

    def _crop(self, logits: list[Tensor], h: int, w: int) -> list[Tensor]:
        """Crop the stride padding; at deep-supervision scales, resize to nnU-Net's in-plane sizes."""
        if not self.deep_supervision:
            return [logits[0][..., :h, :w]]
        out = []
        for lg, lv, (_, sy, sx) in zip(logits, self.net2d.levels, self.ds_scales, strict=True):
            lg = lg[..., : math.ceil(h / 2**lv), : math.ceil(w / 2**lv)]
            size = [round(h * sy), round(w * sx)]
            out.append(lg if list(lg.shape[-2:]) == size else F.interpolate(lg, size=size, mode="bilinear"))
        return out

    def forward(self, x: Tensor, lengths: Tensor | Sequence[int] | None = None) -> Tensor | list[Tensor]:
        kpm, index = self.check_volume(x, lengths)
        b, d = kpm.shape
        h, w = x.shape[-2:]
        slices = self._slices(x, index)
        parts = self._chunks(slices.shape[0])
        keep = torch.is_grad_enabled() or len(parts) == 1  # else: a second encoder pass, one chunk at a time
        kept, embeds = [], []
        for part in parts:
            levels = self.level_features(slices[part])
            embeds.append(self.pool_levels(levels))
            kept.append(levels if keep else None)
        y = scatter_rows(torch.cat(embeds), index, b * d).view(b, d, -1)
        contexts = [gather_rows(c.reshape(b * d, -1), index) for c in self.inter(y, kpm)]
        outs: list[list[Tensor]] = []
        for part, levels in zip(parts, kept, strict=True):
            levels = levels if levels is not None else self.level_features(slices[part])
            shifted = self._shift(levels, [c[part] for c in contexts])
            outs.append(self._crop(self.decode(shifted, slices[part]), h, w))
        volumes = []
        for i, per_scale in enumerate(zip(*outs, strict=True)):
            lg = scatter_rows(torch.cat(per_scale), index, b * d)
            vol = lg.view(b, d, *lg.shape[1:]).transpose(1, 2)  # (B, out, D, h_s, w_s)
            if self.deep_supervision and round(d * self.ds_scales[i][0]) != d:
                size = (max(1, round(d * self.ds_scales[i][0])), *vol.shape[-2:])
                vol = F.interpolate(vol, size=size, mode="trilinear")
            volumes.append(vol)
        return volumes if self.deep_supervision else volumes[0]
