"""LVM-Med ViT-B weights in MONAI's CellSamWrapper (VISTA-2D), the generated cells and the VISTA-2D-style demo."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from scipy import ndimage

from lvmmed_monai import weights as W
from lvmmed_monai.cli import main
from lvmmed_monai.demo.cells import cell_flow_targets, cell_images
from lvmmed_monai.encoders.vit import LVMMedViTB
from lvmmed_monai.engines.cells import VISTA2D_REPORT, run_vista2d_demo, vista2d_loss
from lvmmed_monai.networks import lvmmed_cell_sam
from lvmmed_monai.networks.cell_sam import sam_vit_b_image_encoder

pytest.importorskip("segment_anything")


def _encoder_state(wrapper: torch.nn.Module) -> dict[str, torch.Tensor]:
    return wrapper.model.image_encoder.state_dict()


def _assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    differ = [k for k in want if got[k].shape != want[k].shape or not torch.equal(got[k], want[k])]
    assert not differ, differ[:5]


def test_at_1024_the_image_encoder_holds_exactly_our_tensors(vit_file, sam_vit_state, one_thread):
    """A file in the official lvmmed_vit.pth layout, at SAM's 1024 px: every tensor as stored, no resizing."""
    from monai.networks.nets.cell_sam_wrapper import CellSamWrapper

    net = lvmmed_cell_sam(weights=vit_file)
    assert isinstance(net, CellSamWrapper) and net.network_resize_roi == (1024, 1024)
    assert net.load_report.ok and net.load_report.detected_layout == "sam_vit_b" and not net.load_report.notes
    assert len(net.load_report.loaded) == len(sam_vit_state)
    _assert_same_tensors(_encoder_state(net), sam_vit_state)


def test_smaller_roi_holds_the_resized_tensors_from_either_layout(sam_vit_state, one_thread):
    """At 128 px the encoder holds resize_vit_state of our tensors; timm's layout (LVMMedViTB's state dict)
    and a whole SAM checkpoint (``image_encoder.`` prefix) load to the same tensors."""
    target = sam_vit_b_image_encoder(128).state_dict()  # an independent encoder gives the shapes
    want, notes = W.resize_vit_state(sam_vit_state, target)
    assert want["pos_embed"].shape == (1, 8, 8, 768) and want["blocks.2.attn.rel_pos_h"].shape == (15, 64)
    # a whole SAM checkpoint: image_encoder.* is taken, the decoders' keys are reported as ignored
    full_sam = {f"image_encoder.{k}": v for k, v in sam_vit_state.items()}
    full_sam["mask_decoder.iou_token.weight"] = torch.zeros(1, 256)
    sam_net = lvmmed_cell_sam(weights=full_sam, network_resize_roi=(128, 128))
    assert sam_net.load_report.ok and sorted(sam_net.load_report.notes) == sorted(notes)
    assert sam_net.load_report.ignored == ["mask_decoder.iou_token.weight"]
    _assert_same_tensors(_encoder_state(sam_net), want)

    timm_state = LVMMedViTB(img_size=1024, weights=sam_vit_state).state_dict()
    assert W.detect_layout(timm_state) == "timm_samvit_b"
    timm_net = lvmmed_cell_sam(weights=timm_state, network_resize_roi=128)
    assert timm_net.load_report.ok and timm_net.load_report.detected_layout == "timm_samvit_b"
    _assert_same_tensors(_encoder_state(timm_net), want)


def test_wrong_layout_and_nan_tensors_are_refused(r50_state, sam_vit_state, one_thread):
    with pytest.raises(W.CheckpointMismatchError) as info:
        lvmmed_cell_sam(weights=r50_state, network_resize_roi=64)
    report, msg = info.value.report, str(info.value)
    assert report.expected_layout == "sam_vit_b" and report.detected_layout == "torchvision_resnet50"
    assert "patch_embed.proj.weight" in report.missing and "layer4.2.conv3.weight" in report.unexpected
    assert "missing" in msg and "unexpected" in msg and report.missing[0] in msg and report.unexpected[0] in msg

    bad = dict(sam_vit_state)
    bad["blocks.3.attn.qkv.weight"] = bad["blocks.3.attn.qkv.weight"].clone()
    bad["blocks.3.attn.qkv.weight"][0, 0] = float("nan")
    with pytest.raises(W.CheckpointError, match=r"NaN or Inf.*blocks\.3\.attn\.qkv\.weight"):
        lvmmed_cell_sam(weights=bad, network_resize_roi=64)


@pytest.mark.parametrize("roi", [(128, 64), 100, (8, 8), (64, 64, 64)])
def test_roi_must_be_square_multiple_of_16(roi):
    with pytest.raises(ValueError, match="square and a positive multiple of the patch size 16"):
        lvmmed_cell_sam(network_resize_roi=roi)


def test_missing_segment_anything_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "segment_anything", None)  # import segment_anything now fails
    with pytest.raises(ImportError, match=r'pip install "lvmmed-monai\[sam\]"'):
        lvmmed_cell_sam(network_resize_roi=64)


def test_forward_at_small_roi_keeps_input_size(sam_vit_state, one_thread):
    net = lvmmed_cell_sam(weights=sam_vit_state, network_resize_roi=64).eval()
    x = torch.rand(2, 3, 48, 80)
    with torch.no_grad():
        out = net(x)
        assert out.shape == (2, 3, 48, 80) and torch.isfinite(out).all()
        net.return_features = True
        assert net(x).shape == (2, 256, 4, 4)  # SAM's neck at 64 px: 64 / 16 tokens a side


def test_vista2d_demo_runs_two_steps_and_reports_dice(sam_vit_state, tmp_path, one_thread):
    lines: list[str] = []
    report = run_vista2d_demo(tmp_path / "run", steps=2, size=64, seed=1, weights=sam_vit_state, batch_size=1,
                              num_train=2, num_val=1, log_every=1, log=lines.append)
    assert 0.0 <= report["dice_before"] <= 1.0 and 0.0 <= report["dice_after"] <= 1.0
    assert report["steps"] == 2 and len(report["losses"]) == 2 and all(np.isfinite(report["losses"]))
    assert json.loads((tmp_path / "run" / VISTA2D_REPORT).read_text()) == report
    assert [p.name for p in (tmp_path / "run").iterdir()] == [VISTA2D_REPORT]  # atomic: no temporary left
    assert any("step 2/2" in line for line in lines) and f"after {report['dice_after']:.3f}" in lines[-1]


def test_vista2d_demo_command_passes_its_options(monkeypatch, tmp_path, capsys):
    """The command's wiring (the run itself is tested above): options reach the engine, errors exit 2."""
    import lvmmed_monai.engines.cells as cells

    calls = []
    monkeypatch.setattr(cells, "run_vista2d_demo", lambda out, **kw: calls.append((out, kw)) or {})
    assert main(["vista2d-demo", "--out", str(tmp_path), "--steps", "3", "--size", "64", "--seed", "2",
                 "--weights", "w.pth"]) == 0
    assert calls == [(str(tmp_path), {"steps": 3, "size": 64, "seed": 2, "weights": "w.pth"})]
    assert str(tmp_path / VISTA2D_REPORT) in capsys.readouterr().out
    monkeypatch.undo()
    assert main(["vista2d-demo", "--out", str(tmp_path), "--weights", str(tmp_path / "absent.pth")]) == 2
    assert "weights file not found" in capsys.readouterr().err


def test_vista2d_loss_is_small_for_the_target_itself():
    _, labels = cell_images(1, size=64, seed=3)
    target = torch.from_numpy(cell_flow_targets(labels))
    perfect = torch.cat([20 * (2 * target[:, :1] - 1), 5 * target[:, 1:]], 1)
    assert vista2d_loss(perfect, target) < 1e-6 < vista2d_loss(torch.zeros_like(target), target)


def test_generated_cells_have_consistent_instances():
    images, labels = cell_images(3, size=256, seed=7)
    assert images.shape == (3, 3, 256, 256) and images.dtype == np.float32 and labels.shape == (3, 256, 256)
    assert 0.0 <= images.min() and images.max() <= 1.0
    touching = isolated = 0
    for lab in labels:
        ids = np.unique(lab)
        assert ids[0] == 0 and np.array_equal(ids, np.arange(len(ids))) and len(ids) - 1 >= 10  # 0, 1..K
        for i in ids[1:]:
            assert ndimage.label(lab == i)[1] == 1, f"cell {i} is not one connected region"
            ring = ndimage.binary_dilation(lab == i) & (lab != i)
            touching += bool((lab[ring] > 0).any())
            isolated += not (lab[ring] > 0).any()
    assert touching and isolated
    again, again_labels = cell_images(3, size=256, seed=7)
    assert np.array_equal(again, images) and np.array_equal(again_labels, labels)
    # cells are brighter than the background in the cytoplasm (green) channel
    assert images[:, 1][labels > 0].mean() > images[:, 1][labels == 0].mean() + 0.2


def test_flow_targets_point_to_each_cells_centre():
    """Oracle: the centre of mass and the unit vector to it, computed per pixel with a plain loop."""
    _, labels = cell_images(2, size=64, seed=5)
    flows = cell_flow_targets(labels)
    assert flows.shape == (2, 3, 64, 64) and flows.dtype == np.float32
    assert np.array_equal(flows[:, 0], (labels > 0).astype(np.float32))
    assert not flows[:, 1:][np.broadcast_to((labels == 0)[:, None], flows[:, 1:].shape)].any()
    rng = np.random.default_rng(0)
    for n, y, x in zip(*np.nonzero(labels), strict=True):
        if rng.random() > 0.05:
            continue
        ys, xs = np.nonzero(labels[n] == labels[n, y, x])
        d = np.array([ys.mean() - y, xs.mean() - x])
        want = d / np.linalg.norm(d) if np.linalg.norm(d) > 1e-6 else d
        np.testing.assert_allclose(flows[n, 1:, y, x], want, atol=1e-5)

