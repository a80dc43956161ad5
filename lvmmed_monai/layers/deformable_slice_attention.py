"""Deformable multi-head attention along the slice axis of a volume (Joint 2D-3D SSL, Eq. 6-8).

The paper's *Inter Deformable Attention* is DAT (Xia et al. 2022) in one dimension: the sequence is the
volume's slice embeddings ``(B, D, C)``; an offset network reads the queries and moves a downsampled grid
of reference points along the slice axis; keys and values are read at the moved points by linear
interpolation; a relative position bias, interpolated at the fractional displacements, is added to the
logits. Neither PyTorch, MONAI nor timm has deformable attention over a 1D sequence (MONAI and timm have
none; torchvision's ``deform_conv2d`` is a convolution, not attention; DAT's code is 2D, CUDA-oriented
and not packaged), so it is written here in plain batched PyTorch: CPU and GPU, any number of slices, no
Python loop over slices, and volumes of different depths in one batch.

Padding: volumes are padded at the end of the slice axis; ``key_padding_mask`` (``True`` = padded, the
``nn.MultiheadAttention`` convention) gives each volume's length ``L_b``. Reference points, offsets,
sampling and the bias are all defined in the volume's own slice units and clamped to ``[0, L_b - 1]``, so
the output at a real slice does not depend on what or how much padding follows (see the tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DeformableSliceAttention", "lengths_from_padding_mask", "lerp_gather"]


def lengths_from_padding_mask(key_padding_mask: Tensor | None, batch: int, depth: int, device: torch.device) -> Tensor:
    """``(B, D)`` bool mask (``True`` = padded slice) -> lengths ``(B,)``; checks the padding is trailing.

    ``None`` means every volume has all ``D`` slices. Volumes must have at least one slice.
    """
    if key_padding_mask is None:
        return torch.full((batch,), depth, dtype=torch.long, device=device)
    if key_padding_mask.shape != (batch, depth) or key_padding_mask.dtype != torch.bool:
        raise ValueError(
            f"key_padding_mask must be a bool tensor (B={batch}, D={depth}) with True at padded slices, got "
            f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
        )
    lengths = (~key_padding_mask).sum(1)
    trailing = torch.arange(depth, device=device)[None] >= lengths[:, None]
    if not torch.equal(trailing, key_padding_mask):
        raise ValueError("key_padding_mask must pad at the end of the slice axis (slices 0..L-1 real, then padding)")
    if bool((lengths == 0).any()):
        raise ValueError("a volume in the batch has no slice (empty volume); drop it or give it at least one slice")
    return lengths


def lerp_gather(values: Tensor, positions: Tensor, upper: Tensor) -> Tensor:
    """Linear interpolation of ``values (B, H, D, d)`` at fractional slice ``positions (B, H, K)``.

    ``upper (B,)`` is each volume's last real slice; positions must already lie in ``[0, upper]``. The right
    neighbour is clamped to ``upper`` too, so padded slices are never read (not even with weight 0, which
    would let NaN padding or its gradient through). Differentiable in ``values`` and ``positions``.
    """
    b, h, d, c = values.shape
    i0 = positions.detach().floor().long().clamp_(min=0)
    i0 = torch.minimum(i0, upper.view(b, 1, 1))
    i1 = torch.minimum(i0 + 1, upper.view(b, 1, 1))
    w = (positions - i0.to(positions.dtype)).unsqueeze(-1).to(values.dtype)
    base = (torch.arange(b * h, device=values.device) * d).view(b, h, 1)
    flat = values.reshape(b * h * d, c)
    v0 = flat.index_select(0, (base + i0).flatten()).view(b, h, -1, c)
    v1 = flat.index_select(0, (base + i1).flatten()).view(b, h, -1, c)
    return v0 + (v1 - v0) * w


class _OffsetNetwork(nn.Module):
    """theta_offset of Eq. 7 (DAT's design in 1D): depthwise conv with stride ``r`` -> LayerNorm -> GELU ->
    linear to one offset per reference point. Input ``(N, c, D)`` group queries, output ``(N, ceil(D / r))``."""

    def __init__(self, channels: int, stride: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, kernel_size, stride=stride, padding=kernel_size // 2,
                              groups=channels)
        self.norm = nn.LayerNorm(channels)
        self.out = nn.Linear(channels, 1, bias=False)

    def forward(self, q: Tensor) -> Tensor:
        return self.out(F.gelu(self.norm(self.conv(q).transpose(1, 2)))).squeeze(-1)


class DeformableSliceAttention(nn.Module):
    """Multi-head deformable attention over slice embeddings ``(B, D, C)`` (Eq. 6-8).

    For head ``h`` (offset group ``g(h)``; the paper has one group per head, the default):
    ``q = Y W_q``; reference points ``p_j`` are the centres of the cells of ``r`` slices
    (``K = ceil(D / r)`` points, ``D_G = D / r`` in Eq. 7); ``dp = tanh(theta_offset(q)) * offset_range_factor * r``
    slices; ``s = clamp(p + dp, 0, L - 1)``; ``k~, v~`` = ``Y W_k``, ``Y W_v`` linearly interpolated at ``s``
    (interpolating after the projection equals projecting ``phi(Y; s)``, the map being affine);
    ``O = softmax(q k~^T / sqrt(d) + phi(B^; i - s)) v~`` with ``B^`` a learned bias per head and per relative
    distance ``-M..M`` slices (``M = max_relative_distance``; farther distances clamp, as in Shaw et al. 2018),
    read by linear interpolation at the fractional distance ``i - s``; heads concatenated, ``W_O``.

    With ``r = 1`` and zero offsets this is exactly multi-head attention with the bias ``B^[h, i - j]``.
    A one-slice volume has one key, the slice itself (any offset clamps to it): the output is
    ``W_O W_v y`` per head, a function of that slice alone.

    Args:
        dim: channels ``C`` (divisible by ``num_heads``).
        num_heads: attention heads. offset_groups: heads sharing one set of offsets (``None`` = one per head).
        reference_stride: ``r``, slices per reference point. offset_kernel_size: odd kernel of the offset
            network's depthwise conv (``None`` = ``2 r + 1``).
        offset_range_factor: offsets are bounded by ``factor * r`` slices (DAT's default factor is 2).
        max_relative_distance: ``M`` of the bias table ``(num_heads, 2M + 1)``.
        qkv_bias: biases of the q/k/v projections. attn_drop / proj_drop: dropout rates.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        offset_groups: int | None = None,
        reference_stride: int = 1,
        offset_kernel_size: int | None = None,
        offset_range_factor: float = 2.0,
        max_relative_distance: int = 64,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        groups = offset_groups or num_heads
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim={dim} must be a positive multiple of num_heads={num_heads}")
        if num_heads % groups:
            raise ValueError(f"num_heads={num_heads} must be a multiple of offset_groups={groups}")
        if reference_stride < 1 or max_relative_distance < 1 or offset_range_factor < 0:
            raise ValueError(
                f"need reference_stride >= 1, max_relative_distance >= 1, offset_range_factor >= 0; got "
                f"{reference_stride}, {max_relative_distance}, {offset_range_factor}"
            )
        kernel = offset_kernel_size or 2 * reference_stride + 1
        if kernel % 2 == 0:
            raise ValueError(f"offset_kernel_size must be odd, got {kernel}")
        self.dim, self.num_heads, self.groups = dim, num_heads, groups
        self.head_dim = dim // num_heads
        self.stride, self.range_factor, self.max_distance = reference_stride, offset_range_factor, max_relative_distance
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.offset_net = _OffsetNetwork(dim // groups, reference_stride, kernel)
        self.rel_pos_bias = nn.Parameter(torch.zeros(num_heads, 2 * max_relative_distance + 1))
        nn.init.trunc_normal_(self.rel_pos_bias, std=0.02)
        self.attn_drop, self.proj_drop = attn_drop, nn.Dropout(proj_drop)

    def reference_points(self, lengths: Tensor, num_points: int) -> Tensor:
        """``(B, K)`` centres of each volume's cells of ``r`` real slices (the last cell may be shorter)."""
        j = torch.arange(num_points, device=lengths.device, dtype=torch.float32)[None]
        end = torch.minimum((j + 1) * self.stride, lengths[:, None].float())
        return (j * self.stride + end - 1) / 2

    def relative_bias(self, query_pos: Tensor, key_pos: Tensor) -> Tensor:
        """``phi(B^; R)`` of Eq. 8: bias ``(B, H, D, K)`` at distances ``query_pos (D,) - key_pos (B, H, K)``."""
        m, h = self.max_distance, self.num_heads
        idx = (query_pos.view(1, 1, -1, 1) - key_pos.unsqueeze(2) + m).clamp(0, 2 * m)
        i0 = idx.detach().floor().long().clamp_(max=2 * m - 1)
        w = (idx - i0.to(idx.dtype)).to(self.rel_pos_bias.dtype)
        table = self.rel_pos_bias.reshape(-1)
        i0 = i0 + (torch.arange(h, device=idx.device) * (2 * m + 1)).view(1, h, 1, 1)
        b0, b1 = table[i0], table[i0 + 1]
        return b0 + (b1 - b0) * w

    def forward(
        self, x: Tensor, key_padding_mask: Tensor | None = None, return_positions: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``x (B, D, C)`` -> ``(B, D, C)``; padded slices' outputs are zero.

        Args:
            x: slice embeddings (with positional encoding already added, as in the paper).
            key_padding_mask: ``(B, D)`` bool, ``True`` at padded slices (trailing); None = no padding.
            return_positions: also return the sampled slice positions ``s`` ``(B, groups, K)``.
        """
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"expected slice embeddings (B, D, C={self.dim}), got {tuple(x.shape)}")
        b, d, c = x.shape
        if d == 0:
            raise ValueError("got a volume with 0 slices (empty volume)")
        h, g, hd = self.num_heads, self.groups, self.head_dim
        lengths = lengths_from_padding_mask(key_padding_mask, b, d, x.device)
        slice_idx = torch.arange(d, device=x.device)
        real = (slice_idx[None] < lengths[:, None]).unsqueeze(-1)  # (B, D, 1)
        q = self.q(x)
        # offsets from the queries (Eq. 7); padded queries are zeroed so that no padding reaches a real point
        q_groups = torch.where(real, q, 0.0).view(b, d, g, c // g).permute(0, 2, 3, 1).reshape(b * g, c // g, d)
        # positions in float32 at least, even under autocast: half precision blurs fractional slice indices
        offsets = self.offset_net(q_groups).view(b, g, -1)
        offsets = offsets.to(torch.promote_types(offsets.dtype, torch.float32))
        offsets = offsets.tanh() * (self.range_factor * self.stride)
        num_points = offsets.shape[-1]
        ref = self.reference_points(lengths, num_points)
        upper = lengths - 1
        pos = torch.minimum((ref.unsqueeze(1) + offsets).clamp(min=0), upper.view(b, 1, 1).to(offsets.dtype))
        pos_h = pos.repeat_interleave(h // g, dim=1)  # (B, H, K)
        kv = self.kv(x).view(b, d, 2, h, hd).permute(2, 0, 3, 1, 4)  # (2, B, H, D, hd)
        k = lerp_gather(kv[0], pos_h, upper)
        v = lerp_gather(kv[1], pos_h, upper)
        bias = self.relative_bias(slice_idx.to(pos.dtype), pos_h).to(q.dtype)
        n_points = (lengths + self.stride - 1) // self.stride  # reference points inside each volume
        key_real = torch.arange(num_points, device=x.device)[None] < n_points[:, None]
        bias = bias.masked_fill(~key_real.view(b, 1, 1, num_points), float("-inf"))
        q = q.view(b, d, h, hd).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                             dropout_p=self.attn_drop if self.training else 0.0)
        out = torch.where(real, self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, d, c))), 0.0)
        return (out, pos) if return_positions else out
