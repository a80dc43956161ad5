"""Deformable and neighbourhood attention along the slice axis, against independent oracles."""

from __future__ import annotations

import sys
import types
import warnings

import pytest
import torch
from torch import nn

from lvmmed_monai.layers import DeformableSliceAttention, NeighborhoodSliceAttention, lerp_gather


def _zero_offsets(attn: DeformableSliceAttention) -> DeformableSliceAttention:
    with torch.no_grad():
        attn.offset_net.out.weight.zero_()
    return attn


def _mha_oracle(attn: DeformableSliceAttention, depth: int) -> tuple[nn.MultiheadAttention, torch.Tensor]:
    """torch's own MultiheadAttention with the same projections and the bias B[h, i - j] as a float mask."""
    c, h, m = attn.dim, attn.num_heads, attn.max_distance
    mha = nn.MultiheadAttention(c, h, batch_first=True).to(attn.q.weight.dtype)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([attn.q.weight, attn.kv.weight]))
        mha.in_proj_bias.copy_(torch.cat([attn.q.bias, attn.kv.bias]))
        mha.out_proj.weight.copy_(attn.proj.weight)
        mha.out_proj.bias.copy_(attn.proj.bias)
    i = torch.arange(depth)
    rel = (i[:, None] - i[None, :]).clamp(-m, m) + m
    return mha, attn.rel_pos_bias.detach()[:, rel]  # (H, D, D)


@pytest.mark.parametrize("depth", [1, 6, 13])
def test_zero_offsets_full_grid_is_multihead_attention_with_relative_bias(depth):
    attn = _zero_offsets(DeformableSliceAttention(32, num_heads=4, reference_stride=1, max_relative_distance=8))
    attn = attn.double()
    with torch.no_grad():
        attn.rel_pos_bias.normal_()  # a bias large enough to matter
    x = torch.randn(3, depth, 32, dtype=torch.float64)
    mha, bias = _mha_oracle(attn, depth)
    expected, _ = mha(x, x, x, attn_mask=bias.repeat(3, 1, 1), need_weights=False)
    torch.testing.assert_close(attn(x), expected, rtol=1e-10, atol=1e-10)


def test_zero_offsets_with_padding_is_masked_multihead_attention():
    attn = _zero_offsets(DeformableSliceAttention(16, num_heads=2, max_relative_distance=16)).double()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    pad = torch.arange(9)[None] >= torch.tensor([[9], [4]])
    mha, bias = _mha_oracle(attn, 9)
    mask = bias.repeat(2, 1, 1).masked_fill(pad.repeat_interleave(2, 0)[:, None, :], float("-inf"))
    expected, _ = mha(x, x, x, attn_mask=mask, need_weights=False)
    out = attn(x, key_padding_mask=pad)
    torch.testing.assert_close(out[0], expected[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out[1, :4], expected[1, :4], rtol=1e-10, atol=1e-10)
    assert (out[1, 4:] == 0).all()


def test_gradients_reach_the_offset_network_and_match_finite_differences():
    attn = DeformableSliceAttention(8, num_heads=2, reference_stride=2, offset_range_factor=2.0).double()
    with torch.no_grad():
        attn.offset_net.out.weight.normal_(0, 0.5)
    x = torch.randn(1, 7, 8, dtype=torch.float64, requires_grad=True)
    out, pos = attn(x, return_positions=True)
    assert pos.shape == (1, 2, 4) and (pos != pos.round()).float().mean() > 0.5  # interpolation is used
    out.square().sum().backward()
    for name, p in attn.offset_net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert attn.rel_pos_bias.grad.abs().sum() > 0
    # x -> q -> offsets -> positions -> interpolated keys/values and bias: the whole path, against finite differences
    assert torch.autograd.gradcheck(lambda t: attn(t), (x.detach().requires_grad_(),), eps=1e-6, atol=1e-5,
                                    fast_mode=True)


@pytest.mark.parametrize("stride", [1, 3])
def test_real_slices_do_not_depend_on_padding_content_or_length(stride):
    attn = DeformableSliceAttention(16, num_heads=4, offset_groups=2, reference_stride=stride).eval()
    with torch.no_grad():
        attn.offset_net.out.weight.normal_(0, 1.0)  # large offsets: many points clamp at the volume's end
    lengths = [7, 3, 1]
    vols = [torch.randn(n, 16) for n in lengths]
    alone = [attn(v[None])[0] for v in vols]
    for depth, fill in [(7, 0.0), (12, 1e3), (20, float("nan"))]:
        x = torch.full((3, depth, 16), fill)
        for b, v in enumerate(vols):
            x[b, : len(v)] = v
        pad = torch.arange(depth)[None] >= torch.tensor(lengths)[:, None]
        out = attn(x, key_padding_mask=pad)
        for b, n in enumerate(lengths):
            torch.testing.assert_close(out[b, :n], alone[b], rtol=1e-5, atol=1e-6)
            assert (out[b, n:] == 0).all()


def test_one_slice_is_the_value_path_of_that_slice_whatever_the_offsets():
    attn = DeformableSliceAttention(16, num_heads=4, reference_stride=4)
    with torch.no_grad():
        attn.offset_net.out.weight.normal_(0, 3.0)
    y = torch.randn(5, 1, 16)
    v = nn.functional.linear(y, attn.kv.weight[16:], attn.kv.bias[16:])
    torch.testing.assert_close(attn(y), attn.proj(v), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("depth", [1, 2, 5, 33, 64])
def test_any_depth_and_stride(depth):
    for stride in (1, 2, 4):
        attn = DeformableSliceAttention(8, num_heads=2, reference_stride=stride)
        out, pos = attn(torch.randn(2, depth, 8), return_positions=True)
        assert out.shape == (2, depth, 8) and torch.isfinite(out).all()
        assert pos.shape[-1] == -(-depth // stride) and pos.min() >= 0 and pos.max() <= depth - 1


def test_lerp_gather_matches_numpy_interp():
    import numpy as np

    vals = torch.randn(2, 1, 6, 1, dtype=torch.float64)
    pos = torch.tensor([[[0.0, 0.5, 2.25, 4.0]], [[0.1, 1.9, 2.0, 2.0]]], dtype=torch.float64)
    upper = torch.tensor([5, 2])
    got = lerp_gather(vals, pos, upper)[..., 0]
    for b in range(2):
        n = int(upper[b]) + 1
        ref = np.interp(pos[b, 0].numpy(), np.arange(n), vals[b, 0, :n, 0].numpy())
        np.testing.assert_allclose(got[b, 0].numpy(), ref)


def test_bad_inputs_are_clear_errors():
    attn = DeformableSliceAttention(8, num_heads=2)
    with pytest.raises(ValueError, match=r"\(B, D, C=8\)"):
        attn(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="end of the slice axis"):
        attn(torch.randn(1, 4, 8), key_padding_mask=torch.tensor([[True, False, False, False]]))
    with pytest.raises(ValueError, match="empty volume"):
        attn(torch.randn(2, 3, 8), key_padding_mask=torch.tensor([[False] * 3, [True] * 3]))
    with pytest.raises(ValueError, match="multiple of num_heads"):
        DeformableSliceAttention(10, num_heads=4)


def _dense_window_reference(layer: NeighborhoodSliceAttention, x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Loop over volumes and queries: softmax over natten's window of each query (the oracle)."""
    b, d, c = x.shape
    h, hd, k = layer.num_heads, layer.head_dim, layer.kernel_size
    q, kk, v = layer.qkv(x).view(b, d, 3, h, hd).unbind(2)
    out = torch.zeros(b, d, h, hd, dtype=x.dtype)
    for bi, n in enumerate(lengths):
        for i in range(n):
            w = min(k, n)
            start = min(max(i - k // 2, 0), n - w)
            keys = slice(start, start + w)
            logits = torch.einsum("hd,jhd->hj", q[bi, i], kk[bi, keys]) / hd**0.5
            out[bi, i] = torch.einsum("hj,jhd->hd", logits.softmax(-1), v[bi, keys])
    real = (torch.arange(d)[None] < torch.tensor(lengths)[:, None]).unsqueeze(-1)
    return layer.proj(out.reshape(b, d, c)) * real


def test_neighborhood_attention_matches_the_windowed_loop():
    layer = NeighborhoodSliceAttention(16, num_heads=2, kernel_size=5).double()
    lengths = [11, 3, 6]
    x = torch.randn(3, 11, 16, dtype=torch.float64)
    pad = torch.arange(11)[None] >= torch.tensor(lengths)[:, None]
    torch.testing.assert_close(layer(x, key_padding_mask=pad), _dense_window_reference(layer, x, lengths))


def test_natten_backend_without_natten_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "natten", None)
    with pytest.raises(ImportError, match=r"lvmmed-monai\[natten\]"):
        NeighborhoodSliceAttention(16, num_heads=2, backend="natten")


def test_natten_backend_falls_back_loudly_where_natten_cannot_run(monkeypatch):
    """A stand-in natten module (the real one has no CPU wheels here): used for CPU inference, never for a
    CPU backward or padded batches, where the layer warns and computes the same function itself."""
    calls = []

    def na1d(q, k, v, kernel_size, **kwargs):
        calls.append(kernel_size)
        allowed = ref_mask(q.shape[1], kernel_size)
        t = [a.transpose(1, 2) for a in (q, k, v)]
        return torch.nn.functional.scaled_dot_product_attention(*t, attn_mask=allowed).transpose(1, 2)

    def ref_mask(d, k):
        from lvmmed_monai.layers import neighborhood_mask

        return neighborhood_mask(torch.tensor([d]), d, k)

    fake = types.ModuleType("natten")
    fake.functional = types.SimpleNamespace(na1d=na1d)
    monkeypatch.setitem(sys.modules, "natten", fake)
    monkeypatch.setitem(sys.modules, "natten.functional", fake.functional)
    layer = NeighborhoodSliceAttention(16, num_heads=2, kernel_size=3, backend="natten")
    ours = NeighborhoodSliceAttention(16, num_heads=2, kernel_size=3)
    ours.load_state_dict(layer.state_dict())
    x = torch.randn(2, 8, 16)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(layer(x), ours(x))
    assert calls == [3]
    with pytest.warns(UserWarning, match="no CPU backward"):
        out = layer(x)
    out.sum().backward()
    pad = torch.arange(8)[None] >= torch.tensor([[8], [5]])
    with torch.no_grad(), pytest.warns(UserWarning, match="per-volume lengths"):
        torch.testing.assert_close(layer(x, key_padding_mask=pad), ours(x, key_padding_mask=pad))
    assert calls == [3]


def test_autocast_keeps_sampling_positions_in_float32():
    attn = DeformableSliceAttention(16, num_heads=2, reference_stride=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, pos = attn(torch.randn(2, 9, 16), return_positions=True)
    assert out.dtype == torch.bfloat16 and pos.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("attention, kwargs", [("deformable", {}), ("neighborhood", {"kernel_size": 3})])
def test_inter_slice_transformer_any_attention_padding_invariant(attention, kwargs):
    from lvmmed_monai.networks import InterSliceTransformer

    f_inter = InterSliceTransformer(24, dims=(8, 8, 16, 16), num_heads=(2, 2, 4, 4), attention=attention,
                                    attention_kwargs=kwargs).eval()
    vols = [torch.randn(1, n, 24) for n in (6, 2)]
    y = torch.full((2, 9, 24), 3.0)
    y[0, :6], y[1, :2] = vols[0][0], vols[1][0]
    pad = torch.arange(9)[None] >= torch.tensor([[6], [2]])
    outs = f_inter(y, pad)
    assert [o.shape[-1] for o in outs] == [8, 8, 16, 16]
    for b, v in enumerate(vols):
        for out, alone in zip(outs, f_inter(v), strict=True):
            torch.testing.assert_close(out[b, : v.shape[1]], alone[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="valid"):
        InterSliceTransformer(24, attention="full")
