"""The ``lvmmed`` command line."""

from __future__ import annotations

import torch

from lvmmed_monai import weights as W
from lvmmed_monai.cli import main


def test_weights_inspect_reports_layout_counts_and_loadability(r50_file, capsys):
    assert main(["weights", "inspect", r50_file]) == 0
    out = capsys.readouterr().out
    assert "detected layout: torchvision_resnet50" in out and "tensors: 320" in out
    assert "parameters: 25,557,032" in out  # torchvision ResNet-50 with fc
    assert "loads into lvmmed_resnet50: yes" in out and "loads into lvmmed_vit_b: no" in out


def test_weights_inspect_vit_and_bad_file(vit_file, tmp_path, capsys):
    assert main(["weights", "inspect", vit_file]) == 0
    out = capsys.readouterr().out
    assert "sam_vit_b" in out and "loads into lvmmed_vit_b: yes" in out
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    assert main(["weights", "inspect", str(tmp_path / "junk.pth")]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err


def test_weights_convert_roundtrip(vit_file, tmp_path, sam_vit_state):
    timm_path, sam_path = tmp_path / "timm.pth", tmp_path / "sam.pth"
    assert main(["weights", "convert", vit_file, str(timm_path), "--to", "timm_samvit_b"]) == 0
    assert W.detect_layout(torch.load(timm_path, weights_only=True)) == "timm_samvit_b"
    assert main(["weights", "convert", str(timm_path), str(sam_path), "--to", "sam_vit_b"]) == 0
    back = torch.load(sam_path, weights_only=True)
    assert all(torch.equal(back[k], v) for k, v in sam_vit_state.items())


def test_weights_list_shows_sources_and_licences(capsys):
    assert main(["weights", "list"]) == 0
    out = capsys.readouterr().out
    assert "lvmmed_resnet.torch" in out and "lvmmed_vit.pth" in out and "BY-NC-SA" in out
