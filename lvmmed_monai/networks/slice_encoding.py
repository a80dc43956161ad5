"""f_intra of the hybrid networks: an LVM-Med 2D encoder on the real slices of a volume batch, in chunks.

``SliceEncoderBase`` holds what the hybrid backbone, classifier and segmentation network share: input checks,
the real (non-padded) slices, chunking, the multi-level features of each encoder, the slice embeddings
of Eq. 9 and the volume mean. See :mod:`lvmmed_monai.networks.hybrid` for the networks themselves.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lvmmed_monai.encoders import ENCODERS
from lvmmed_monai.networks.inter_slice import InterSliceTransformer
from lvmmed_monai.networks.padding import pad_to_multiple
from lvmmed_monai.registry import Registry

__all__ = ["CONTEXT_LEVELS", "hybrid_spec", "SliceEmbeddings", "SliceEncoderBase", "Weights", "gather_rows",
           "scatter_rows"]

# The hybrid network's one choice per encoder: which levels of f_intra (its level_maps()) get f_inter's context.
# The rest is the encoder's own facts (lvmmed_monai.encoders): level_channels, feature_stride, last_block_level.
CONTEXT_LEVELS = Registry("hybrid encoder", {"lvmmed_resnet50": (1, 2, 3, 4), "lvmmed_vit_b": (0, 1, 2, 4)})


def hybrid_spec(encoder: str) -> dict[str, Any]:
    """``{"channels", "stride", "last", "context"}`` of ``encoder`` for the hybrid networks: its levels' channels,
    its input stride, its last block's level (the single-level embedding of the "w/o multi-feature" ablation and
    the maps the slice graph-matching term reads) and the levels that get context."""
    cls, context = ENCODERS.get_or_raise(encoder), CONTEXT_LEVELS.get_or_raise(encoder)
    return {"channels": tuple(cls.level_channels), "stride": int(cls.feature_stride),
            "last": int(cls.last_block_level), "context": tuple(context)}


Weights = str | os.PathLike | Mapping[str, Any] | None


@dataclass
class SliceEmbeddings:
    """f_intra's output for a batch of volumes.

    ``y``: ``(B, D, F_in)`` slice embeddings of Eq. 9 (zero at padded slices); ``key_padding_mask``: ``(B, D)``
    True at padded slices; ``index``: flat ``B * D`` indices of the real slices (None when none is padded);
    ``maps``: the last level's maps of the real slices ``(N, C, h, w)`` (ResNet-50 2048, ViT 768), when asked.
    """

    y: Tensor
    key_padding_mask: Tensor
    index: Tensor | None
    maps: Tensor | None = None


def gather_rows(t: Tensor, index: Tensor | None) -> Tensor:
    """The rows ``index`` of ``t`` (all rows when None): the real slices of a flattened ``(B * D, ...)`` batch."""
    return t if index is None else t.index_select(0, index)


def scatter_rows(t: Tensor, index: Tensor | None, total: int) -> Tensor:
    """Rows of the real slices ``(N, ...)`` -> ``(total, ...)`` with zeros at padded slices."""
    if index is None:
        return t
    return t.new_zeros((total, *t.shape[1:])).index_copy(0, index, t)


class SliceEncoderBase(nn.Module):
    """f_intra on slices (chunked, real slices only), slice embeddings, and the input checks."""

    encoder_name: str
    in_channels: int
    slice_chunk: int | None
    inter: InterSliceTransformer
    frozen_intra: bool = False  # True keeps f_intra in eval mode (BatchNorm statistics frozen) under train()
    multi_feature: bool = True  # Eq. 9's concatenation of every level; False: the last block only (the ablation)

    @property
    def f_intra(self) -> nn.Module:
        raise NotImplementedError

    def train(self, mode: bool = True) -> SliceEncoderBase:
        super().train(mode)
        if self.frozen_intra:
            self.f_intra.eval()
        return self

    def set_trainable_parts(self, intra: bool, inter: bool) -> None:
        """Train f_intra and / or f_inter only, everything else frozen (the joint 2D-3D SSL stages, set by
        :func:`~lvmmed_monai.ssl.joint3d.set_training_stage`); a frozen f_intra keeps its BatchNorm statistics
        too (eval mode through ``train()``)."""
        self.requires_grad_(False)
        self.f_intra.requires_grad_(intra)
        self.inter.requires_grad_(inter)
        self.frozen_intra = not intra
        self.train(self.training)

    @staticmethod
    def _spec(encoder: str) -> dict:
        return hybrid_spec(encoder)

    @property
    def embed_dim(self) -> int:
        """``F_in``, the width of ``Y`` (every level's channels, or the last block's without multi-feature)."""
        spec = self._spec(self.encoder_name)
        return sum(spec["channels"]) if self.multi_feature else spec["channels"][spec["last"]]

    def check_volume(self, x: Tensor, lengths: Tensor | Sequence[int] | None) -> tuple[Tensor, Tensor | None]:
        """Validate ``(B, C, D, H, W)`` and ``lengths``; return the key padding mask and the real-slice index."""
        if x.dim() != 5:
            raise ValueError(f"expected a volume batch (B, C, D, H, W), got {tuple(x.shape)}; for 2D images use the "
                             "2D networks or add a depth axis (x[:, :, None])")
        b, c, d, h, w = x.shape
        if c != self.in_channels:
            raise ValueError(f"the network was built for in_channels={self.in_channels}, the volume has C={c} "
                             "(set in_channels when building it; weights adapt conv1)")
        if min(b, d, h, w) == 0:
            raise ValueError(f"empty volume batch {tuple(x.shape)}: every axis needs at least one voxel")
        if lengths is None:
            kpm, index = torch.zeros(b, d, dtype=torch.bool, device=x.device), None
        else:
            lengths = torch.as_tensor(lengths, device=x.device)
            if lengths.shape != (b,) or bool((lengths < 1).any() | (lengths > d).any()):
                raise ValueError(f"lengths must hold B={b} slice counts in 1..D={d}, got {lengths.tolist()}")
            kpm = torch.arange(d, device=x.device)[None] >= lengths[:, None]
            index = None if not bool(kpm.any()) else (~kpm).flatten().nonzero().squeeze(1)
        return kpm, index

    def _slices(self, x: Tensor, index: Tensor | None) -> Tensor:
        """Real slices ``(N, C, H', W')`` padded at the end to the encoder's stride; checks for NaN/Inf."""
        b, c, d, h, w = x.shape
        slices = gather_rows(x.transpose(1, 2).reshape(b * d, c, h, w), index)
        if not bool(torch.isfinite(slices).all()):
            raise ValueError("the volume holds NaN or Inf values; clean or mask them before the network")
        stride = int(self._spec(self.encoder_name)["stride"])
        return pad_to_multiple(slices, stride)

    def _chunks(self, n: int) -> list[slice]:
        """At most ``slice_chunk`` slices per chunk, sizes balanced (33 -> 17 + 16, not 32 + 1: a one-slice
        chunk would give BatchNorm one sample in training)."""
        n = int(n)  # a traced shape (ckpt_export --use_trace) arrives as a 0-d tensor
        count = -(-n // (self.slice_chunk or n))
        bounds = [round(i * n / count) for i in range(count + 1)]
        return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def level_features(self, slices: Tensor) -> list[Tensor]:
        """f_intra's multi-level maps of padded slices ``(n, C, H', W')`` (the encoder's ``level_maps``)."""
        return self.f_intra.level_maps(slices)

    def pool_levels(self, levels: list[Tensor]) -> Tensor:
        """Eq. 9: the slice embedding is the concatenation of every level's global average, ``(n, F_in)``; the
        last block's average alone with ``multi_feature=False`` (the joint 2D-3D paper's "w/o multi-feature")."""
        if not self.multi_feature:
            return levels[self._spec(self.encoder_name)["last"]].mean(dim=(-2, -1))
        return torch.cat([f.mean(dim=(-2, -1)) for f in levels], dim=1)

    def slice_embeddings(self, x: Tensor, lengths: Tensor | Sequence[int] | None = None,
                         return_maps: bool = False) -> SliceEmbeddings:
        """f_intra on every real slice of ``x (B, C, D, H, W)``, chunked; maps of the last level if asked."""
        kpm, index = self.check_volume(x, lengths)
        b, d = kpm.shape
        slices = self._slices(x, index)
        embeds, maps = [], []
        for part in self._chunks(slices.shape[0]):
            levels = self.level_features(slices[part])
            embeds.append(self.pool_levels(levels))
            if return_maps:
                maps.append(levels[self._spec(self.encoder_name)["last"]])
        y = scatter_rows(torch.cat(embeds), index, b * d).view(b, d, -1)
        return SliceEmbeddings(y, kpm, index, torch.cat(maps) if return_maps else None)

    @staticmethod
    def volume_embedding(h: Tensor, key_padding_mask: Tensor) -> Tensor:
        """Mean of per-slice features ``(B, D, F)`` over each volume's real slices -> ``(B, F)``."""
        real = (~key_padding_mask).unsqueeze(-1).to(h.dtype)
        return (h * real).sum(1) / real.sum(1)
