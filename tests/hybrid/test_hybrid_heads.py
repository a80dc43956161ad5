"""2D-3D hybrid networks: classifier, backbone, nnU-Net deep supervision, ViT variant."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lvmmed_monai.networks import LVMMedHybridBackbone, LVMMedHybridClassifier, LVMMedHybridSegNet
from lvmmed_monai.networks.ds_unet import deep_supervision_scales

SMALL_INTER = {"dims": (32, 32, 64, 64), "num_heads": (2, 2, 4, 4)}



def test_classifier_two_fc_layers_padding_and_backward():
    torch.manual_seed(0)
    clf = LVMMedHybridClassifier(4, inter_kwargs=SMALL_INTER, hidden_dim=16).eval()
    assert [type(m).__name__ for m in clf.head] == ["Linear", "ReLU", "Dropout", "Linear"]
    a, b = torch.rand(1, 1, 4, 32, 32), torch.rand(1, 1, 2, 32, 32)
    x = torch.cat([a, F.pad(b, (0, 0, 0, 0, 0, 2), value=7.0)])
    with torch.no_grad():
        logits = clf(x, lengths=[4, 2])
        torch.testing.assert_close(logits, torch.cat([clf(a), clf(b)]), rtol=1e-4, atol=1e-5)
    clf.train()
    clf(x, lengths=torch.tensor([4, 2])).sum().backward()
    assert clf.encoder.conv1.weight.grad.abs().sum() > 0 and clf.inter.stems[0][1].weight.grad.abs().sum() > 0


def test_backbone_gives_four_per_slice_outputs():
    net = LVMMedHybridBackbone(inter_kwargs=SMALL_INTER)
    outs = net(torch.rand(2, 1, 4, 32, 32), lengths=[4, 1])
    assert [tuple(o.shape) for o in outs] == [(2, 4, 32), (2, 4, 32), (2, 4, 64), (2, 4, 64)]
    assert all((o[1, 1:] == 0).all() for o in outs)
    emb = net.slice_embeddings(torch.rand(1, 1, 3, 32, 32), return_maps=True)
    assert emb.y.shape == (1, 3, 3904) and emb.maps.shape == (3, 2048, 1, 1)


def test_deep_supervision_outputs_at_nnunet_3d_scales():
    scales = deep_supervision_scales([[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]])
    torch.manual_seed(0)
    net = LVMMedHybridSegNet(1, 2, ds_scales=scales, inter_kwargs=SMALL_INTER)
    x = torch.rand(1, 1, 9, 32, 20)
    outs = net(x)
    expected = [tuple(round(n * s) for n, s in zip((9, 32, 20), sc, strict=True)) for sc in scales]
    assert [tuple(o.shape[2:]) for o in outs] == expected and all(o.shape[:2] == (1, 2) for o in outs)
    keys = set(net.state_dict())
    net.net2d.decoder.deep_supervision = False
    assert net(x).shape == (1, 2, 9, 32, 20) and set(net.state_dict()) == keys


def test_vit_hybrid_is_the_vit_unetr_with_zero_context():
    torch.manual_seed(0)
    net = LVMMedHybridSegNet(1, 2, encoder="lvmmed_vit_b", inter_kwargs=SMALL_INTER,
                             net2d_kwargs={"img_size": 32}).eval()
    x = torch.rand(1, 1, 2, 30, 33)
    with torch.no_grad():
        out = net(x)
        assert out.shape == (1, 2, 2, 30, 33)
        torch.testing.assert_close(out[:, :, 1], net.net2d(x[:, :, 1]), rtol=1e-4, atol=1e-4)
    assert net.embed_dim == 3328
    with pytest.raises(ValueError, match="one output"):
        LVMMedHybridSegNet(1, 2, encoder="lvmmed_vit_b", ds_scales=[[1, 1, 1]])


def test_without_multi_feature_the_slice_embedding_is_the_last_blocks_pooled_map():
    """multi_feature=False (the joint 2D-3D paper's "w/o multi-feature"): Y_i = GAP(layer4) (ResNet-50), width
    2048 instead of the five blocks' 3904; the networks build f_inter on that width and run."""
    from lvmmed_monai.ssl.joint3d import Joint3DLoss

    torch.manual_seed(0)
    full = LVMMedHybridBackbone(inter_kwargs=SMALL_INTER).eval()
    last = LVMMedHybridBackbone(inter_kwargs=SMALL_INTER, multi_feature=False).eval()
    last.encoder.load_state_dict(full.encoder.state_dict())
    assert (full.embed_dim, last.embed_dim) == (3904, 2048)
    x = torch.rand(2, 1, 3, 32, 32)
    with torch.no_grad():
        y_full, y_last = full.slice_embeddings(x).y, last.slice_embeddings(x).y
        layer4 = full.encoder(x.transpose(1, 2).reshape(6, 1, 32, 32))[-1].mean((-2, -1)).view(2, 3, -1)
    torch.testing.assert_close(y_last, layer4)
    torch.testing.assert_close(y_full[..., -2048:], y_last)  # the last block is the tail of Eq. 9's concatenation
    assert [h.shape[-1] for h in last(x)] == [h.shape[-1] for h in full(x)]
    assert LVMMedHybridClassifier(3, inter_kwargs=SMALL_INTER, multi_feature=False)(x).shape == (2, 3)
    seg = LVMMedHybridSegNet(1, 2, inter_kwargs=SMALL_INTER, multi_feature=False)
    assert seg.embed_dim == 2048 and seg(x).shape == (2, 2, 3, 32, 32)
    loss = Joint3DLoss.for_network(last.train(), num_prototypes=8, hidden_dim=None)
    assert loss.intra.in_dim == 2048 and torch.isfinite(loss(last, x, x.flip(-1)).loss)
