"""1D neighbourhood attention along the slice axis: natten's kernels when they apply, ours otherwise.

An alternative to :class:`~lvmmed_monai.layers.DeformableSliceAttention` with a fixed window: slice ``i``
attends to the ``kernel_size`` nearest slices of its volume (natten's window: shifted inwards at the ends,
so every query sees exactly ``min(kernel_size, L)`` keys). natten (``pip install 'lvmmed-monai[natten]'``)
has fused GPU kernels but no CPU backward and no per-volume lengths, so the layer runs natten's ``na1d``
only where natten computes exactly this function (CUDA, or CPU without gradients; no padding; at least
``kernel_size`` slices) and otherwise our PyTorch version (a band mask + ``scaled_dot_product_attention``),
with a warning whenever natten was asked for and cannot be used. No relative position bias: natten >= 0.20
dropped it, and both backends must compute the same function (order comes from the positional encoding).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lvmmed_monai.layers.deformable_slice_attention import lengths_from_padding_mask

__all__ = ["NeighborhoodSliceAttention", "neighborhood_mask", "import_natten"]

BACKENDS = ("torch", "natten")


def import_natten():
    """Import natten or fail with the install command (it is an optional extra of this package)."""
    try:
        import natten.functional
    except ImportError as err:
        raise ImportError(
            "backend='natten' needs natten, an optional extra: pip install 'lvmmed-monai[natten]' (a natten "
            "build matching your torch/CUDA, see natten's install notes), or use backend='torch' (same result)"
        ) from err
    return natten.functional


def neighborhood_mask(lengths: Tensor, depth: int, kernel_size: int) -> Tensor:
    """``(B, D, D)`` bool: query ``i`` may attend key ``j`` of its volume (natten's 1D window, dilation 1)."""
    i = torch.arange(depth, device=lengths.device)
    win = torch.minimum(lengths, torch.full_like(lengths, kernel_size)).view(-1, 1)  # (B, 1)
    start = torch.minimum((i[None] - kernel_size // 2).clamp(min=0), lengths.view(-1, 1) - win)  # (B, D)
    j = i.view(1, 1, -1)
    return (j >= start.unsqueeze(-1)) & (j < (start + win).unsqueeze(-1))


class NeighborhoodSliceAttention(nn.Module):
    """Multi-head 1D neighbourhood attention over slice embeddings ``(B, D, C)``, same interface as
    :class:`~lvmmed_monai.layers.DeformableSliceAttention` (``key_padding_mask`` True = padded slice).

    Args:
        dim, num_heads: channels and heads. kernel_size: odd window length in slices.
        backend: "torch" (ours, everywhere) or "natten" (natten where it applies, see the module docstring;
            natten must be installed, checked at construction).
    """

    def __init__(self, dim: int, num_heads: int = 8, kernel_size: int = 7, backend: str = "torch",
                 qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim={dim} must be a positive multiple of num_heads={num_heads}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; valid: {list(BACKENDS)}")
        self._natten = import_natten() if backend == "natten" else None
        self.dim, self.num_heads, self.kernel_size, self.backend = dim, num_heads, kernel_size, backend
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop, self.proj_drop = attn_drop, nn.Dropout(proj_drop)

    def _natten_applies(self, q: Tensor, padded: bool) -> bool:
        if self._natten is None:
            return False
        reason = None
        if q.device.type == "cpu" and q.requires_grad:
            reason = "natten has no CPU backward"
        elif padded:
            reason = "natten has no per-volume lengths (key_padding_mask)"
        elif self.training and self.attn_drop > 0:
            reason = "natten has no attention dropout"
        if reason is not None:
            warnings.warn(f"NeighborhoodSliceAttention(backend='natten'): {reason}; using lvmmed_monai's PyTorch "
                          "neighbourhood attention instead (same function, slower)", stacklevel=3)
            return False
        return q.shape[1] >= self.kernel_size  # shorter volumes: the window is the whole volume (dense path)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"expected slice embeddings (B, D, C={self.dim}), got {tuple(x.shape)}")
        b, d, c = x.shape
        if d == 0:
            raise ValueError("got a volume with 0 slices (empty volume)")
        lengths = lengths_from_padding_mask(key_padding_mask, b, d, x.device)
        padded = key_padding_mask is not None and bool(key_padding_mask.any())
        real = (torch.arange(d, device=x.device)[None] < lengths[:, None]).unsqueeze(-1)
        q, k, v = self.qkv(x).view(b, d, 3, self.num_heads, self.head_dim).unbind(2)  # (B, D, H, hd) each
        if self._natten_applies(q, padded):
            out = self._natten.na1d(q.contiguous(), k.contiguous(), v.contiguous(), kernel_size=self.kernel_size)
        else:
            allowed = neighborhood_mask(lengths, d, self.kernel_size).unsqueeze(1)  # (B, 1, D, D)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=allowed,
                                                 dropout_p=self.attn_drop if self.training else 0.0).transpose(1, 2)
        return torch.where(real, self.proj_drop(self.proj(out.reshape(b, d, c))), 0.0)
