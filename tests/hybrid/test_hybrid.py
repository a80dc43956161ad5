"""2D-3D hybrid networks: shapes, gradients, one-slice behaviour, padding, chunking, deep supervision."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lvmmed_monai.networks import LVMMedHybridSegNet

SMALL_INTER = {"dims": (32, 32, 64, 64), "num_heads": (2, 2, 4, 4)}


def _with_context(net: LVMMedHybridSegNet) -> LVMMedHybridSegNet:
    """Non-zero context maps (they start at zero), so that f_inter changes the output and gets gradients."""
    with torch.no_grad():
        for proj in net.context:
            proj.weight.normal_(0, 0.05)
    return net


@pytest.fixture(scope="module")
def segnet() -> LVMMedHybridSegNet:
    torch.manual_seed(0)
    return LVMMedHybridSegNet(1, 3, inter_kwargs=SMALL_INTER)


@pytest.mark.parametrize("depth", [1, 7, 33])
def test_segmentation_forward_backward_keeps_the_input_shape(segnet, depth):
    net = _with_context(segnet).train()
    net.zero_grad()
    # two volumes for D = 1: BatchNorm in training needs more than one value per channel (1 x 1 maps here),
    # as for the 2D network; D = 33 runs as two chunks of 17 and 16 slices (slice_chunk=32)
    b = 2 if depth == 1 else 1
    x = torch.rand(b, 1, depth, 32, 20)
    out = net(x)
    assert out.shape == (b, 3, depth, 32, 20)
    out.square().mean().backward()
    grads = {n: p.grad for n, p in net.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["net2d.encoder.conv1.weight"].abs().sum() > 0
    assert grads["inter.stems.0.1.weight"].abs().sum() > 0
    offset_grad = grads["inter.blocks.3.0.attn.offset_net.conv.weight"].abs().sum()
    assert (offset_grad > 0) if depth > 1 else (offset_grad == 0)  # one slice: every offset clamps to it


def test_zero_context_is_the_2d_network_on_every_slice(segnet):
    net = segnet.eval()
    with torch.no_grad():
        for proj in net.context:
            proj.weight.zero_()
        x = torch.rand(2, 1, 3, 32, 20)
        out = net(x)
        for d in range(3):
            torch.testing.assert_close(out[:, :, d], net.net2d(x[:, :, d]), rtol=1e-5, atol=1e-5)


def test_one_slice_is_the_2d_network_shifted_by_its_own_context(segnet):
    """D = 1: f_inter sees only the slice (its offset networks do not matter); the output is the 2D decoder on
    the slice's encoder levels plus the context maps of that slice's f_inter outputs."""
    net = _with_context(segnet).eval()
    x = torch.rand(2, 1, 1, 32, 20)
    with torch.no_grad():
        out = net(x)
        x2d = F.pad(x[:, :, 0], (0, 12))  # to the encoder's stride 32
        levels = net.level_features(x2d)
        contexts = net.inter(net.pool_levels(levels)[:, None])
        shifted = [lv.clone() for lv in levels]
        for proj, idx, ctx in zip(net.context, net.context_levels, contexts, strict=True):
            shifted[idx] += proj(ctx[:, 0])[:, :, None, None]
        expected = net.net2d.segmentation_head(net.net2d.decoder(shifted, net.net2d.skip_connect))[..., :32, :20]
        torch.testing.assert_close(out[:, :, 0], expected, rtol=1e-5, atol=1e-5)
        for block in net.inter.blocks:
            for layer in block:
                layer.attn.offset_net.out.weight.normal_(0, 5.0)
        torch.testing.assert_close(net(x), out)
        alone = torch.cat([net(x[i : i + 1]) for i in range(2)])  # and no other volume of the batch enters
        torch.testing.assert_close(alone, out, rtol=1e-5, atol=1e-5)


def test_real_slices_do_not_depend_on_padding(segnet):
    net = _with_context(segnet).eval()
    vols = [torch.rand(1, 1, n, 32, 32) for n in (4, 2, 1)]
    with torch.no_grad():
        alone = [net(v) for v in vols]
        for depth, fill in [(4, 0.0), (7, float("nan"))]:
            x = torch.full((3, 1, depth, 32, 32), fill)
            for b, v in enumerate(vols):
                x[b, :, : v.shape[2]] = v[0]
            out = net(x, lengths=[4, 2, 1])
            for b, v in enumerate(vols):
                n = v.shape[2]
                torch.testing.assert_close(out[b : b + 1, :, :n], alone[b], rtol=1e-4, atol=1e-5)
                assert (out[b, :, n:] == 0).all()


def test_chunked_and_two_pass_inference_equal_one_pass(segnet):
    net = _with_context(segnet).eval()
    x = torch.rand(2, 1, 3, 32, 32)
    with torch.no_grad():
        net.slice_chunk = None
        whole = net(x, lengths=[3, 2])
        net.slice_chunk = 2  # 5 real slices -> 3 chunks, and a second encoder pass without gradients
        chunked = net(x, lengths=[3, 2])
    with torch.enable_grad():
        one_pass = net(x, lengths=[3, 2])
    net.slice_chunk = 32
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(one_pass.detach(), whole, rtol=1e-4, atol=1e-5)


def test_bad_volumes_are_clear_errors(segnet):
    with pytest.raises(ValueError, match=r"\(B, C, D, H, W\)"):
        segnet(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="in_channels=1"):
        segnet(torch.rand(1, 3, 2, 32, 32))
    with pytest.raises(ValueError, match="empty volume"):
        segnet(torch.rand(1, 1, 0, 32, 32))
    x = torch.rand(1, 1, 3, 32, 32)
    x[0, 0, 1, 5, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        segnet(x)
    with pytest.raises(ValueError, match="lengths"):
        segnet(torch.rand(2, 1, 3, 32, 32), lengths=[3, 4])
    with pytest.raises(ValueError, match="valid"):
        LVMMedHybridSegNet(1, 2, encoder="resnet18")
