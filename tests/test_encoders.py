"""Encoders: shapes, channel handling, FlexibleUNet registration, input validation."""

from __future__ import annotations

import inspect

import pytest
import torch

import lvmmed_monai  # noqa: F401
from lvmmed_monai.encoders import LVMMedResNet50, LVMMedViTB, load_encoder


def test_flexible_unet_backbone_registered_on_import():
    from monai.networks.nets import FlexibleUNet
    from monai.networks.nets.flexible_unet import FLEXUNET_BACKBONE

    assert "lvmmed_resnet50" in FLEXUNET_BACKBONE.register_dict
    net = FlexibleUNet(in_channels=1, out_channels=3, backbone="lvmmed_resnet50", spatial_dims=2)
    assert isinstance(net.encoder, LVMMedResNet50) and net.encoder.conv1.in_channels == 1
    assert net(torch.rand(2, 1, 64, 64)).shape == (2, 3, 64, 64)


def test_flexible_unet_refuses_3d_and_implicit_pretrained():
    from monai.networks.nets import FlexibleUNet

    with pytest.raises(ValueError, match="2D encoder"):
        FlexibleUNet(in_channels=1, out_channels=2, backbone="lvmmed_resnet50", spatial_dims=3)
    with pytest.raises(ValueError, match="weights"):
        FlexibleUNet(in_channels=1, out_channels=2, backbone="lvmmed_resnet50", pretrained=True)


def test_vit_forward_shapes_at_1024_and_small_sizes(vit_file):
    big = load_encoder("lvmmed_vit_b", weights=vit_file).eval()  # SAM's own 1024 x 1024 setting
    with torch.no_grad():
        assert big(torch.rand(1, 3, 1024, 1024)).shape == (1, 256, 64, 64)
    small = load_encoder("lvmmed_vit_b", weights=vit_file, img_size=96, in_channels=1).eval()
    x = torch.rand(2, 1, 96, 96)
    with torch.no_grad():
        neck, inter = small.intermediates(x)
        assert neck.shape == (2, 256, 6, 6) and [t.shape for t in inter] == [(2, 768, 6, 6)] * 4
        assert small.feature_map(x).shape == (2, 768, 6, 6)
        assert torch.equal(small.feature_map(x), inter[-1])
        assert small(torch.rand(1, 1, 160, 64)).shape == (1, 256, 10, 4)  # other sizes at run time


def test_vit_one_channel_equals_grey_replicated(sam_vit_state):
    rgb = load_encoder("lvmmed_vit_b", weights=sam_vit_state, img_size=32).eval().double()
    grey = load_encoder("lvmmed_vit_b", weights=sam_vit_state, img_size=32, in_channels=1).eval().double()
    x = torch.rand(1, 1, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(grey(x), rgb(x.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "bad, match",
    [(torch.rand(1, 3, 30, 32), "multiples of 16"), (torch.rand(1, 1, 32, 32), r"\(N, 3, H, W\)")],
)
def test_vit_rejects_bad_inputs(bad, match):
    with pytest.raises(ValueError, match=match):
        LVMMedViTB(img_size=32)(bad)


def test_vit_rejects_bad_construction():
    with pytest.raises(ValueError, match="multiple of the patch size"):
        LVMMedViTB(img_size=100)
    with pytest.raises(ValueError, match="out_indices"):
        LVMMedViTB(img_size=32, out_indices=(12,))


def test_zero_init_residual_makes_every_block_the_identity_at_init(one_thread):
    from lvmmed_monai.engines import build_encoder

    enc = build_encoder("lvmmed_resnet50", 64, zero_init_residual=True).eval()
    bn3 = [b.bn3.weight for layer in (enc.layer1, enc.layer2, enc.layer3, enc.layer4) for b in layer]
    assert len(bn3) == 16 and all(float(w.abs().max()) == 0.0 for w in bn3)
    x = torch.rand(2, 256, 8, 8)  # post-ReLU input of a block without downsampling
    assert torch.equal(enc.layer1[1](x), x)
    # loaded weights win, and the option is for the ResNet only
    standard = build_encoder("lvmmed_resnet50", 64).state_dict()
    loaded = build_encoder("lvmmed_resnet50", 64, weights=standard, zero_init_residual=True).state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in standard.items())
    with pytest.raises(ValueError, match="zero_init_residual"):
        build_encoder("lvmmed_vit_b", 64, zero_init_residual=True)


def test_frozen_stages_get_no_update_and_keep_their_batchnorm_statistics(one_thread):
    """frozen_stages=1: an Adam step in train mode changes layer2 onwards (weights and BatchNorm statistics)
    and leaves the stem and layer1 bit for bit (parameters and buffers), as mmdet's ResNet(frozen_stages=1)."""
    from lvmmed_monai.engines import build_encoder

    torch.manual_seed(0)
    enc = build_encoder("lvmmed_resnet50", 64, frozen_stages=1)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    opt = torch.optim.Adam([p for p in enc.parameters() if p.requires_grad], lr=1e-2)
    enc.train()
    assert not enc.bn1.training and not enc.layer1.training and enc.layer2.training and enc.training
    enc.feature_map(torch.rand(4, 3, 64, 64)).square().mean().backward()
    opt.step()
    after = enc.state_dict()
    frozen = [k for k in before if k.split(".")[0] in ("conv1", "bn1", "layer1")]
    assert len(frozen) == 6 + 3 * 18 + 6  # stem conv + BN (5 tensors); 3 bottlenecks of 3 conv + 3 BN; downsample
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    for k in ("layer2.0.conv1.weight", "layer2.0.bn1.running_mean", "layer4.2.bn3.weight"):
        assert not torch.equal(before[k], after[k]), k
    assert all(p.grad is None for p in enc.layer1.parameters())
    # modules swapped in later (synchronised BatchNorm for multi-process runs, CUDA's and ours for CPU) stay frozen
    from lvmmed_monai.engines.distributed import GlobalBatchNorm2d, convert_sync_batchnorm

    layer2_bn = enc.layer2[0].bn1.weight
    cpu = convert_sync_batchnorm(enc, torch.device("cpu")).train()
    assert isinstance(cpu.bn1, GlobalBatchNorm2d) and isinstance(cpu.layer1[0].bn1, GlobalBatchNorm2d)
    assert not cpu.bn1.training and not cpu.layer1[0].bn1.training and cpu.layer2[0].bn1.training
    assert not any(p.requires_grad for p in cpu.layer1.parameters()) and not cpu.bn1.weight.requires_grad
    assert cpu.layer2[0].bn1.weight is layer2_bn  # the same parameter objects (the optimizer's references hold)
    assert all(torch.equal(v, after[k]) for k, v in cpu.state_dict().items())
    enc = torch.nn.SyncBatchNorm.convert_sync_batchnorm(enc).train()
    assert isinstance(enc.bn1, torch.nn.SyncBatchNorm) and not enc.bn1.training and enc.layer2[0].bn1.training
    # -1 (default) freezes nothing; loaded weights are frozen as loaded
    assert all(p.requires_grad for p in build_encoder("lvmmed_resnet50", 64).parameters())
    loaded = build_encoder("lvmmed_resnet50", 64, weights=before, frozen_stages=4)
    assert not any(p.requires_grad for p in loaded.parameters())
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("bad", [5, -2, True, 1.0, "1"])
def test_frozen_stages_rejects_bad_values(bad):
    from lvmmed_monai.engines import build_encoder

    with pytest.raises(ValueError, match="frozen_stages"):
        build_encoder("lvmmed_resnet50", 64, frozen_stages=bad)


def test_frozen_stages_is_for_the_resnet_only():
    from lvmmed_monai.engines import build_encoder

    with pytest.raises(ValueError, match="frozen_stages applies to lvmmed_resnet50 only"):
        build_encoder("lvmmed_vit_b", 64, frozen_stages=1)


@pytest.mark.parametrize("name", ["lvmmed_resnet50", "lvmmed_vit_b"])
def test_encoder_facts_are_what_the_encoder_computes(name):
    """Each encoder class states its facts once (lvmmed_monai.encoders); they must match a real forward pass."""
    from lvmmed_monai.encoders import ENCODERS, build_encoder, input_normalization

    cls = ENCODERS[name]
    encoder = build_encoder(name, 64).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        levels, last = encoder.level_maps(x), encoder.feature_map(x)
    assert tuple(m.shape[1] for m in levels) == cls.level_channels
    assert tuple(64 // m.shape[-1] for m in levels) == cls.level_strides
    assert last.shape[1] == cls.feature_dim and 64 // last.shape[-1] == cls.feature_stride
    assert torch.equal(levels[cls.last_block_level], last)
    mean, std = input_normalization(name)
    scale = cls.pretrain_normalization["input_range"][1]  # the plan's statistics, on the plan's input scale
    assert mean == pytest.approx(tuple(m / scale for m in cls.pretrain_normalization["mean"]))
    assert std == pytest.approx(tuple(s / scale for s in cls.pretrain_normalization["std"]))
    assert ("img_size" in inspect.signature(cls).parameters) == cls.sized_by_image
    with pytest.raises(ValueError, match="unknown encoder 'resnet50'; valid names"):
        input_normalization("resnet50")


def test_registries_take_a_third_encoder_in_their_register_call():
    """A new encoder: its class with the facts, ENCODERS.register, and SEGMENTATION_NETS_2D.register for its 2D
    segmentation network; then build_encoder, input_normalization and segmentation_net_2d take its name."""
    from torch import nn

    from lvmmed_monai.encoders import ENCODERS, build_encoder, input_normalization
    from lvmmed_monai.networks import SEGMENTATION_NETS_2D, segmentation_net_2d
    from lvmmed_monai.registry import Registry

    class Tiny(nn.Module):
        feature_dim, feature_stride, sized_by_image = 8, 4, False
        input_mean, input_std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
        level_channels, level_strides, last_block_level = (4, 8), (2, 4), 1

        def __init__(self, in_channels: int = 3, weights: object = None) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(in_channels, 4, 2, 2), nn.Conv2d(4, 8, 2, 2)

        def level_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
            a = self.a(x)
            return [a, self.b(a)]

        def feature_map(self, x: torch.Tensor) -> torch.Tensor:
            return self.level_maps(x)[-1]

    class TinySeg(nn.Module):
        def __init__(self, in_channels: int, out_channels: int, weights: object = None, strict: bool = True) -> None:
            super().__init__()
            self.conv = nn.Conv2d(in_channels, out_channels, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x)

    try:
        ENCODERS.register("tiny", Tiny)
        SEGMENTATION_NETS_2D.register("tiny", TinySeg)
        assert isinstance(build_encoder("tiny", 32), Tiny)
        assert input_normalization("tiny") == ((0.5,) * 3, (0.25,) * 3)
        assert segmentation_net_2d("tiny", 1, 3)(torch.rand(1, 1, 8, 8)).shape == (1, 3, 8, 8)
        with pytest.raises(ValueError, match="already registered"):
            ENCODERS.register("tiny", TinySeg)
        assert ENCODERS.register("tiny", Tiny) is Tiny  # the same object again is fine
    finally:
        ENCODERS.pop("tiny", None)
        SEGMENTATION_NETS_2D.pop("tiny", None)
    reg = Registry("widget")

    @reg.register("w")
    def widget() -> int:
        return 1

    assert reg.get_or_raise("w") is widget
    with pytest.raises(ValueError, match=r"unknown widget 'v'; valid names: \['w'\]"):
        reg.get_or_raise("v")
