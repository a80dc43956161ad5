"""Networks on LVM-Med encoders: forward/backward, and one real training step."""

from __future__ import annotations

import pytest
import torch
from monai.losses import DiceCELoss

from lvmmed_monai.data import phantom_batch
from lvmmed_monai.networks import LVMMedClassifier, LVMMedFlexibleUNet, LVMMedViTUNETR, lvmmed_faster_rcnn


def _backward_ok(module: torch.nn.Module, out: torch.Tensor) -> None:
    out.float().mean().backward()
    grads = [p.grad for p in module.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("size", [(64, 64), (70, 90)])
def test_resnet_unet_any_size_forward_backward(r50_file, size):
    net = LVMMedFlexibleUNet(in_channels=1, out_channels=3, weights=r50_file)
    out = net(torch.rand(2, 1, *size))
    assert out.shape == (2, 3, *size)
    _backward_ok(net, out)


def test_flexible_unet_trains_one_step_and_improves_on_that_batch(r50_file):
    torch.manual_seed(0)
    images, labels = phantom_batch(4, size=64, num_classes=3)
    net = LVMMedFlexibleUNet(in_channels=1, out_channels=3, weights=r50_file)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.train()
    before = loss_fn(net(images), labels)
    opt.zero_grad()
    before.backward()
    enc_w = net.encoder.layer1[0].conv1.weight.detach().clone()
    opt.step()
    assert not torch.equal(enc_w, net.encoder.layer1[0].conv1.weight)  # the encoder is fine-tuned
    with torch.no_grad():
        after = loss_fn(net(images), labels)
    assert after < before


@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
def test_vit_unetr_forward_backward(vit_file, size):
    net = LVMMedViTUNETR(in_channels=1, out_channels=2, img_size=64, weights=vit_file, feature_size=8)
    out = net(torch.rand(1, 1, *size))
    assert out.shape == (1, 2, *size)
    _backward_ok(net, out)


def test_classifier_linear_probe_freezes_encoder(r50_file):
    clf = LVMMedClassifier(num_classes=3, weights=r50_file, in_channels=1, freeze_encoder=True)
    clf.train()
    assert not clf.encoder.training and clf.head.training
    running = clf.encoder.bn1.running_mean.clone()
    out = clf(torch.rand(4, 1, 64, 64))
    assert out.shape == (4, 3)
    out.sum().backward()
    assert all(p.grad is None for p in clf.encoder.parameters())
    assert clf.head[0].weight.grad is not None
    assert torch.equal(running, clf.encoder.bn1.running_mean)  # BN statistics frozen


def test_classifier_full_finetune_with_hidden_layers(vit_file):
    clf = LVMMedClassifier(num_classes=2, encoder="lvmmed_vit_b", weights=vit_file, img_size=32,
                           hidden_dims=(64,), dropout=0.1)
    out = clf(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 2)
    _backward_ok(clf, out)


def test_faster_rcnn_backbone_carries_lvmmed_weights_and_trains(r50_file, r50_state):
    det = lvmmed_faster_rcnn(num_classes=3, weights=r50_file, min_size=64, max_size=64)
    body = det.backbone.body
    assert torch.equal(body.layer4[2].conv3.weight, r50_state["layer4.2.conv3.weight"])
    assert torch.equal(body.bn1.running_var, r50_state["bn1.running_var"])
    assert not body.conv1.weight.requires_grad and body.layer4[0].conv1.weight.requires_grad
    det.train()
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[20.0, 10.0, 60.0, 50.0]]), "labels": torch.tensor([2])}]
    losses = det(images, targets)
    assert {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"} <= set(losses)
    sum(losses.values()).backward()
    assert body.layer4[0].conv1.weight.grad is not None
    det.eval()
    with torch.no_grad():
        out = det([torch.rand(3, 64, 64)])
    assert set(out[0]) == {"boxes", "labels", "scores"}


def test_faster_rcnn_one_channel(r50_file):
    det = lvmmed_faster_rcnn(num_classes=2, weights=r50_file, in_channels=1, min_size=64, max_size=64).eval()
    with torch.no_grad():
        out = det([torch.rand(1, 64, 64)])
    assert out[0]["boxes"].shape[-1] == 4


def test_deep_supervision_unet_any_patch_and_anisotropic_scales():
    from lvmmed_monai.networks.ds_unet import LVMMedDeepSupervisionUNet, deep_supervision_scales

    scales = deep_supervision_scales([[1, 1], [2, 2], [2, 1], [2, 2], [2, 2], [2, 2]])
    assert scales == [[1, 1], [0.5, 0.5], [0.25, 0.5], [0.125, 0.25], [0.0625, 0.125]]
    net = LVMMedDeepSupervisionUNet(in_channels=2, out_channels=4, ds_scales=scales)
    outs = net(torch.rand(1, 2, 70, 90))
    assert [tuple(o.shape[-2:]) for o in outs] == [(70, 90), (35, 45), (18, 45), (9, 22), (4, 11)]
    # deep supervision off: one full-resolution output, the same parameters
    keys = set(net.state_dict())
    net.decoder.deep_supervision = False
    out = net(torch.rand(1, 2, 70, 90))
    assert out.shape == (1, 4, 70, 90) and set(net.state_dict()) == keys
    out.mean().backward()
    assert net.encoder.conv1.weight.grad is not None and net.heads["0"].weight.grad is not None
