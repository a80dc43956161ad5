"""Checkpoint reading, layout detection/conversion and the dedicated mismatch error."""

from __future__ import annotations

import hashlib
import os
import pickle

import pytest
import torch
import torchvision

import lvmmed_monai  # noqa: F401  (registers the FlexibleUNet backbone)
from lvmmed_monai import weights as W
from lvmmed_monai.encoders import LVMMedResNet50, load_encoder


def _torchvision_features(model: torchvision.models.ResNet, x: torch.Tensor) -> list[torch.Tensor]:
    x = model.relu(model.bn1(model.conv1(x)))
    feats = [x]
    x = model.maxpool(x)
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        x = layer(x)
        feats.append(x)
    return feats


def test_resnet50_official_layout_loads_strictly_and_matches_torchvision(r50_file, r50_state):
    assert "fc.weight" in r50_state and W.detect_layout(r50_state) == "torchvision_resnet50"
    enc = load_encoder("lvmmed_resnet50", weights=r50_file).eval()
    assert enc.load_report.ok and len(enc.load_report.loaded) == 318
    ref = torchvision.models.resnet50(weights=None).eval()
    ref.load_state_dict(r50_state)
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        ours, theirs = enc(x), _torchvision_features(ref, x)
        assert torch.allclose(enc.feature_map(x), theirs[-1], atol=1e-5)
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {f"module.{k}": v for k, v in sd.items()},
        lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3},
        lambda sd: {"model": sd},
        lambda sd: {"network_weights": {f"encoder.{k}": v for k, v in sd.items()}},
        lambda sd: {f"backbone.{k}": v for k, v in sd.items()},
    ],
    ids=["module", "state_dict+module", "model", "nnunet-encoder", "backbone"],
)
def test_wrappers_and_prefixes_are_accepted(tmp_path, r50_state, wrap):
    path = tmp_path / "ckpt.pth"
    torch.save(wrap(r50_state), path)
    enc = load_encoder("lvmmed_resnet50", weights=str(path))
    assert enc.load_report.ok
    assert torch.equal(enc.layer4[2].conv3.weight, r50_state["layer4.2.conv3.weight"])


def test_our_pretraining_checkpoint_loads_encoder_part(tmp_path, r50_state):
    """Training checkpoints of our pretraining hold the encoder beside the SSL head and optimizer state."""
    enc_state = {k: v for k, v in r50_state.items() if not k.startswith("fc.")}
    ckpt = {
        "encoder": enc_state,
        "loss": {"projector.weight": torch.zeros(128, 2048)},
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]},
        W.PRETRAIN_META_KEY: {"arch": "lvmmed_resnet50", "iteration": 7},
    }
    torch.save(ckpt, tmp_path / "pretrain.pt")
    state, extra = W.read_checkpoint(tmp_path / "pretrain.pt")
    assert W.detect_layout(state) == "torchvision_resnet50" and extra[W.PRETRAIN_META_KEY]["iteration"] == 7
    report = LVMMedResNet50(weights=str(tmp_path / "pretrain.pt")).load_report
    assert report.ok and any("pretraining checkpoint" in n for n in report.notes)


def test_encoder_extracted_from_a_full_flexible_unet_checkpoint(tmp_path, r50_state):
    from monai.networks.nets import FlexibleUNet

    net = FlexibleUNet(in_channels=3, out_channels=2, backbone="lvmmed_resnet50")
    net.encoder.load_state_dict({k: v for k, v in r50_state.items() if not k.startswith("fc.")})
    torch.save({"model": net.state_dict()}, tmp_path / "unet.pt")
    report = LVMMedResNet50(weights=str(tmp_path / "unet.pt")).load_report
    assert report.ok and report.ignored
    assert all(k.startswith(("decoder.", "segmentation_head.")) for k in report.ignored)


def test_one_channel_resnet_equals_grey_replicated_to_rgb(r50_file):
    # float64 through the network; the only rounding left is the float32 sum of the conv1 kernels
    rgb = load_encoder("lvmmed_resnet50", weights=r50_file).eval().double()
    grey = load_encoder("lvmmed_resnet50", weights=r50_file, in_channels=1).eval().double()
    x = torch.rand(2, 1, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(
            grey.feature_map(x), rgb.feature_map(x.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-4
        )
    assert any("3 to 1 input channels" in n for n in grey.load_report.notes)


def test_other_channel_counts_repeat_rgb_kernels_scaled(r50_state):
    w = r50_state["conv1.weight"]
    two = W.adapt_in_channels(w, 2)
    assert torch.allclose(two, torch.stack([w[:, 0], w[:, 1]], 1) * 1.5)
    six = W.adapt_in_channels(w, 6)
    assert torch.allclose(six, torch.cat([w, w], 1) * 0.5)
    # six channels holding the same RGB image twice respond like the RGB image
    enc6 = load_encoder("lvmmed_resnet50", weights=r50_state, in_channels=6).eval().double()
    enc3 = load_encoder("lvmmed_resnet50", weights=r50_state).eval().double()
    x = torch.rand(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(
            enc6.feature_map(torch.cat([x, x], 1)), enc3.feature_map(x), rtol=1e-4, atol=1e-4
        )


def test_sam_timm_roundtrip_is_lossless(sam_vit_state):
    assert W.detect_layout(sam_vit_state) == "sam_vit_b"
    timm_sd = W.sam_to_timm(sam_vit_state)
    assert W.detect_layout(timm_sd) == "timm_samvit_b"
    assert "blocks.0.mlp.fc1.weight" in timm_sd and "blocks.0.mlp.lin1.weight" not in timm_sd
    back = W.convert_state_dict(timm_sd, "sam_vit_b")
    assert back.keys() == sam_vit_state.keys()
    assert all(torch.equal(back[k], sam_vit_state[k]) for k in back)
    assert sam_vit_state["pos_embed"].shape == (1, 64, 64, 768)


def test_sam_checkpoint_with_image_encoder_prefix(tmp_path, sam_vit_state):
    path = tmp_path / "sam.pth"
    torch.save({f"image_encoder.{k}": v for k, v in sam_vit_state.items()}, path)
    enc = load_encoder("lvmmed_vit_b", weights=str(path), img_size=64)
    assert enc.load_report.ok and enc.load_report.detected_layout == "sam_vit_b"


def test_vit_load_time_resize_equals_run_time_resize(sam_vit_state):
    """Loading at img_size 64 (tables resized on load) == the 1024 model run on a 64 x 64 input (timm and
    SAM's get_rel_pos resize at run time), an independent path through the same interpolations."""
    small = load_encoder("lvmmed_vit_b", weights=sam_vit_state, img_size=64).eval().double()
    full = load_encoder("lvmmed_vit_b", weights=sam_vit_state, img_size=1024).eval().double()
    assert small.pos_embed.shape == (1, 4, 4, 768) and small.blocks[2].attn.rel_pos_h.shape == (7, 64)
    assert small.blocks[0].attn.rel_pos_h.shape == (27, 64)  # windowed blocks keep window-14 tables
    x = torch.rand(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():  # the tables were resized in float32 on load, at run time in float64
        torch.testing.assert_close(small(x), full(x), rtol=1e-4, atol=1e-4)


def test_vit_matches_segment_anything_image_encoder(sam_vit_state):
    """Our timm-based encoder equals SAM's own ImageEncoderViT given the converted weights."""
    from functools import partial

    from segment_anything.modeling import ImageEncoderViT

    ours = load_encoder("lvmmed_vit_b", weights=sam_vit_state, img_size=64).eval().double()
    sam = ImageEncoderViT(
        img_size=64, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4,
        out_chans=256, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
        global_attn_indexes=(2, 5, 8, 11), window_size=14,
    ).eval().double()
    sam.load_state_dict(W.timm_to_sam(ours.state_dict()), strict=True)
    x = torch.rand(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), sam(x), rtol=1e-9, atol=1e-9)


def _report_of(exc_info) -> W.LoadReport:
    assert isinstance(exc_info.value, W.CheckpointMismatchError)
    return exc_info.value.report


def test_wrong_architecture_gives_dedicated_error(tmp_path):
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(W.CheckpointMismatchError) as info:
        load_encoder("lvmmed_resnet50", weights=str(tmp_path / "r18.pth"))
    report = _report_of(info)
    assert report.missing and report.shape_mismatches and report.expected_layout == "torchvision_resnet50"
    msg = str(info.value)
    assert "missing" in msg and "shape mismatches" in msg and "torchvision_resnet50" in msg and "more)" in msg
    # the ViT checkpoint is the wrong architecture for the ResNet too
    with pytest.raises(W.CheckpointMismatchError):
        load_encoder("lvmmed_resnet50", weights=W.sam_to_timm(W.timm_to_sam(_vit_like())))


def _vit_like() -> dict[str, torch.Tensor]:
    return {"patch_embed.proj.weight": torch.zeros(768, 3, 16, 16), "blocks.0.mlp.fc1.weight": torch.zeros(4, 4)}


def test_wrong_shape_gives_dedicated_error(tmp_path, r50_state):
    bad = dict(r50_state)
    bad["layer2.0.conv2.weight"] = torch.zeros(128, 128, 5, 5)
    with pytest.raises(W.CheckpointMismatchError) as info:
        load_encoder("lvmmed_resnet50", weights=bad)
    assert [k for k, _, _ in _report_of(info).shape_mismatches] == ["layer2.0.conv2.weight"]
    # tolerant mode loads the rest and returns the report
    enc = load_encoder("lvmmed_resnet50", weights=bad, strict=False)
    assert not enc.load_report.ok and torch.equal(enc.conv1.weight, r50_state["conv1.weight"])


def test_foreign_prefix_gives_dedicated_error_with_hint(tmp_path, r50_state):
    path = tmp_path / "foreign.pth"
    torch.save({f"resnet.{k}": v for k, v in r50_state.items()}, path)
    with pytest.raises(W.CheckpointMismatchError) as info:
        load_encoder("lvmmed_resnet50", weights=str(path))
    assert "prefix='resnet.'" in str(info.value)
    assert len(_report_of(info).missing) == 318
    enc = LVMMedResNet50()
    assert W.load_weights(enc, str(path), prefix="resnet.").ok


def test_truncated_file_gives_dedicated_error(tmp_path, r50_file):
    data = open(r50_file, "rb").read()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(W.CheckpointError, match="truncated or corrupt"):
        load_encoder("lvmmed_resnet50", weights=str(path))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_code_running_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _Evil()}, path, pickle_protocol=2)
    with pytest.raises(W.CheckpointError, match="refused to load"):
        W.read_checkpoint(path)
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(W.CheckpointError):
        load_encoder("lvmmed_resnet50", weights=str(raw))


def test_missing_file_and_unknown_encoder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="lvmmed weights list"):
        load_encoder("lvmmed_resnet50", weights=str(tmp_path / "nope.torch"))
    with pytest.raises(ValueError, match="lvmmed_resnet50"):
        load_encoder("resnet50")


def test_download_file_url_atomic_and_sha256(tmp_path, r50_file):
    digest = hashlib.sha256(open(r50_file, "rb").read()).hexdigest()
    url = f"file://{r50_file}"
    path = W.resolve_weights(url, sha256=digest, cache_dir=tmp_path / "cache")
    assert path.read_bytes() == open(r50_file, "rb").read()
    with pytest.raises(W.CheckpointError, match="sha256"):
        W.download(url, tmp_path / "bad" / "w.torch", sha256="0" * 64)
    assert not list((tmp_path / "bad").iterdir())  # nothing half-written left behind


def test_download_from_local_http_server(tmp_path, r50_file):
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=os.path.dirname(r50_file))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/{os.path.basename(r50_file)}"
        path = W.resolve_weights(url, cache_dir=tmp_path)
        enc = load_encoder("lvmmed_resnet50", weights=str(path))
        assert enc.load_report.ok
    finally:
        server.shutdown()
        server.server_close()


def test_hf_address_is_parsed_and_offline_mode_is_respected(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="hf://"):
        W.resolve_weights("hf://just-a-file.pth")
    with pytest.raises(Exception) as info:  # offline and not cached: huggingface_hub refuses, no network
        W.resolve_weights("hf://someone/lvmmed/lvmmed_resnet.torch", cache_dir=tmp_path)
    assert "offline" in str(info.value).lower() or "cache" in str(info.value).lower()


def test_registry_names_files_layouts_and_both_licences():
    assert W.OFFICIAL_WEIGHTS["lvmmed_resnet50"].layout == "torchvision_resnet50"
    assert W.OFFICIAL_WEIGHTS["lvmmed_vit_b"].filename == "lvmmed_vit.pth"
    assert "BY-NC-ND" in W.LICENCE_NOTE and "BY-NC-SA" in W.LICENCE_NOTE


def test_save_atomic_leaves_no_partial_file(tmp_path):
    class Boom:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError):
        W.save_atomic({"x": Boom()}, tmp_path / "out.pt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name, kwargs", [("lvmmed_resnet50", {}), ("lvmmed_vit_b", {"img_size": 32})])
def test_export_encoder_official_layout_and_adaptation_plan(tmp_path, name, kwargs):
    import json

    enc = load_encoder(name, in_channels=1, **kwargs)
    path = W.export_encoder(enc, tmp_path / "export" / "encoder.pth", patch_size=(32, 32))
    state = torch.load(path, weights_only=True)
    assert W.detect_layout(state) == ("torchvision_resnet50" if name == "lvmmed_resnet50" else "sam_vit_b")
    again = load_encoder(name, weights=str(path), in_channels=1, **kwargs)  # strict
    assert all(torch.equal(a, b) for a, b in zip(enc.state_dict().values(), again.state_dict().values(), strict=True))
    plan = json.loads((path.parent / W.ADAPTATION_PLAN_NAME).read_text())
    assert plan["num_input_channels"] == 1 and plan["input_patch_size"] == [32, 32]
    assert plan["state_dict_key_to_stem"] == ("conv1" if name == "lvmmed_resnet50" else "patch_embed.proj")
    assert plan["weights_file"] == "encoder.pth" and plan["pretrain_normalization"]["scheme"] in ("imagenet", "sam")
    assert sorted(p.name for p in path.parent.iterdir()) == [W.ADAPTATION_PLAN_NAME, "encoder.pth"]
