"""f_inter of Joint 2D-3D SSL: a transformer over a volume's slice embeddings, four pyramid blocks of
deformable attention (Eq. 6-8), giving each slice a feature with inter-slice context."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lvmmed_monai.layers import SLICE_ATTENTION

__all__ = ["InterSliceTransformer", "InterSliceLayer", "sinusoidal_positions"]


def sinusoidal_positions(depth: int, dim: int, device: torch.device | None = None) -> Tensor:
    """``(depth, dim)`` sine/cosine encoding of the slice index (Vaswani et al. 2017): the paper's "positional
    encoding to provide order information", defined for any number of slices."""
    pos = torch.arange(depth, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(depth, dim, device=device)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return pe


class InterSliceLayer(nn.Module):
    """One pre-norm transformer layer over slices: ``x + Attn(LN x)``, then ``x + MLP(LN x)`` (the paper's
    "multi-head attention layer followed by a simple feed-forward layer")."""

    def __init__(self, dim: int, num_heads: int, attention: str = "deformable", mlp_ratio: float = 4.0,
                 dropout: float = 0.0, **attention_kwargs: Any) -> None:
        super().__init__()
        attn_cls = SLICE_ATTENTION.get_or_raise(attention)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = attn_cls(dim, num_heads=num_heads, proj_drop=dropout, **attention_kwargs)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim),
                                 nn.Dropout(dropout))

    def forward(self, x: Tensor, key_padding_mask: Tensor | None, real: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), key_padding_mask=key_padding_mask)
        return torch.where(real, x + self.mlp(self.norm2(x)), 0.0)


class InterSliceTransformer(nn.Module):
    """f_inter: slice embeddings ``Y (B, D, in_dim)`` (Eq. 9) -> four per-slice outputs ``(B, D, dims[i])``.

    A pyramid of four blocks (the paper's "four pyramid structure blocks"; its appendix sizes are not in our
    copy): block ``i`` maps the previous output to width ``dims[i]`` (LayerNorm + Linear; block 0 maps ``Y``
    and adds the sinusoidal slice position), then runs ``depths[i]`` layers of deformable attention whose
    reference grid has ``reference_strides[i]`` slices per point. Widening blocks with coarse-to-fine
    reference grids is DAT's pyramid read along the slice axis, which must keep one output per slice
    (Eq. 14 decodes each slice's output ``h_i^N``; the segmentation decoders need one context per slice).
    Every block output is layer-normalised; padded slices stay zero. The defaults (widths 256, 256, 512,
    512, one layer each) make 9.0M parameters with the ResNet-50 embedding, so the hybrid ResNet-50
    backbone has 32.5M, close to the paper's 31.16M (Table 8).

    Args:
        in_dim: width of ``Y`` (sum of the pooled encoder levels: 3904 for ResNet-50, 3328 for ViT-B).
        dims, depths, num_heads, reference_strides: per block (four entries each).
        attention: a name in :data:`lvmmed_monai.layers.SLICE_ATTENTION` ("deformable", "neighborhood").
        attention_kwargs: extra arguments for every attention layer (e.g. ``offset_range_factor``,
            ``max_relative_distance``; ``kernel_size`` / ``backend`` for "neighborhood").
    """

    def __init__(
        self,
        in_dim: int,
        dims: Sequence[int] = (256, 256, 512, 512),
        depths: Sequence[int] = (1, 1, 1, 1),
        num_heads: Sequence[int] = (8, 8, 16, 16),
        reference_strides: Sequence[int] = (4, 2, 2, 1),
        attention: str = "deformable",
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        attention_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not len(dims) == len(depths) == len(num_heads) == len(reference_strides) or not dims:
            raise ValueError("dims, depths, num_heads and reference_strides need one entry per block, got "
                             f"{list(dims)}, {list(depths)}, {list(num_heads)}, {list(reference_strides)}")
        self.in_dim, self.dims = in_dim, tuple(dims)
        self.stems, self.blocks, self.norms = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        width = in_dim
        for i, dim in enumerate(dims):
            stem = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, dim)) if (i == 0 or width != dim) else None
            self.stems.append(stem or nn.Identity())
            kwargs = dict(attention_kwargs or {})
            if attention == "deformable":
                kwargs.setdefault("reference_stride", reference_strides[i])
            self.blocks.append(nn.ModuleList(
                InterSliceLayer(dim, num_heads[i], attention, mlp_ratio, dropout, **kwargs) for _ in range(depths[i])
            ))
            self.norms.append(nn.LayerNorm(dim))
            width = dim

    @property
    def out_dim(self) -> int:
        return self.dims[-1]

    def forward(self, y: Tensor, key_padding_mask: Tensor | None = None) -> list[Tensor]:
        """``y (B, D, in_dim)``, ``key_padding_mask (B, D)`` (True = padded) -> list of ``(B, D, dims[i])``."""
        if y.dim() != 3 or y.shape[-1] != self.in_dim:
            raise ValueError(f"expected slice embeddings (B, D, {self.in_dim}), got {tuple(y.shape)}")
        b, d, _ = y.shape
        real = torch.ones(b, d, 1, dtype=torch.bool, device=y.device)
        if key_padding_mask is not None:
            real = ~key_padding_mask.unsqueeze(-1)
        x, outputs = y, []
        for i, (stem, layers, norm) in enumerate(zip(self.stems, self.blocks, self.norms, strict=True)):
            x = stem(x)
            if i == 0:
                x = x + sinusoidal_positions(d, x.shape[-1], y.device).to(x.dtype)
            x = torch.where(real, x, 0.0)
            for layer in layers:
                x = layer(x, key_padding_mask, real)
            x = torch.where(real, norm(x), 0.0)
            outputs.append(x)
        return outputs
