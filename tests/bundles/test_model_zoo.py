"""The MONAI model zoo's CI steps (its ``ci/verify_bundle.py``) on every bundle of ours, one parametrised test
per step: ``verify_metadata`` against the schema in the repository; ``verify_net_in_out`` driven by
metadata.json's ``network_data_format`` (with the zoo's default sizes p = n = any = 1); ``ckpt_export`` to
TorchScript from a checkpoint of the network's own generated weights, whose export must carry those weights and
give the eager network's outputs; ``large_files.yml`` for the released LVM-Med weights (read by MONAI's own
``download_large_files``, which is stopped before it downloads anything); and ``version`` / ``changelog``.

Where a step cannot apply, the bundle is in an exclusion table with its reason, as the zoo keeps
``exclude_verify_shape_list`` / ``exclude_verify_torchscript_list`` in ``ci/bundle_custom_data.py``; a test
checks each reason still holds, so an exclusion cannot outlive it."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from monai.bundle import ConfigParser, ckpt_export, verify_metadata, verify_net_in_out

from lvmmed_monai.weights import OFFICIAL_WEIGHTS

REPO = Path(__file__).resolve().parents[2]
SCHEMA = REPO / "bundles" / "schema" / "meta_schema_20240725.json"
BUNDLES = ("lvmmed_cls", "lvmmed_det", "lvmmed_hybrid3d", "lvmmed_pretrain", "lvmmed_sam", "lvmmed_seg")

# The network and config the zoo's steps use: ``network_def`` in configs/inference.* by default (the zoo's
# ``_get_net_id`` / ``_find_bundle_file``); lvmmed_hybrid3d's inference config is named inference_seg.yaml.
NET_CONFIG: dict[str, tuple[str, str]] = {
    "lvmmed_cls": ("network_def", "inference.yaml"),
    "lvmmed_det": ("network_def", "inference.yaml"),
    "lvmmed_hybrid3d": ("network_def", "inference_seg.yaml"),
    "lvmmed_sam": ("network_def", "inference.yaml"),
    "lvmmed_seg": ("network_def", "inference.yaml"),
}
PRETRAIN_REASON = (
    "self-supervised pretraining bundle: no inference config and no network_def; its network, train.yaml's "
    "`encoder`, returns a list of 5 feature maps (ResNet-50) or SAM's neck (ViT-B), and its product is the "
    "encoder file in the official LVM-Med layout that the other bundles load, not a TorchScript model (the "
    "model zoo has no SSL pretraining bundle)"
)
EXCLUDE_VERIFY_SHAPE: dict[str, str] = {
    "lvmmed_det": "a detector takes a list of images of any size and returns a list of dicts (boxes, labels, "
                  "scores) of any length: no output tensor whose channels to check (the zoo excludes its "
                  "lung_nodule_ct_detection for the same reason); test_lvmmed_det.py checks the dict keys",
    "lvmmed_pretrain": PRETRAIN_REASON,
}
SAM_REASON = (
    "segment-anything's PromptEncoder does not script (its PositionEmbeddingRandom.forward passes a `device: Any` "
    "to torch.ones), and a trace would freeze the box prompts: the network's forward(image, boxes) is useful only "
    "with boxes, which ckpt_export's single input_shape cannot give; use the PyTorch checkpoint"
)
EXCLUDE_TORCHSCRIPT: dict[str, str] = {"lvmmed_pretrain": PRETRAIN_REASON, "lvmmed_sam": SAM_REASON}
# Exports the zoo's plain ckpt_export (torch.jit.script) cannot do. lvmmed_hybrid3d does not script (module-typed
# attributes of the inter-slice transformer); it exports traced, and the trace fixes the batch size and slice
# count (N, D) it was traced at (any in-plane size works): for use, export it at (1, 1, *roi_size) of
# inference_seg.yaml and run it with sliding_window true and sw_batch_size 1. In the zoo's CI, whose ckpt_export
# has no use_trace, it would go in exclude_verify_torchscript_list.
EXPORT_OPTIONS: dict[str, dict[str, Any]] = {"lvmmed_hybrid3d": {"use_trace": True, "input_shape": [1, 1, 3, 16, 16]}}
# Config overrides for the export test: tiny images for the detector, and every proposal kept (score threshold 0)
# so that there are detections to compare.
EXPORT_OVERRIDES: dict[str, dict[str, Any]] = {
    "lvmmed_det": {"image_size": 64, "max_image_size": 96,
                   "net_kwargs": {"box_score_thresh": 0.0, "box_detections_per_img": 20,
                                  "rpn_pre_nms_top_n_test": 200, "rpn_post_nms_top_n_test": 100}},
}
# Inputs the exported and eager networks are compared on, beyond the export shape: other sizes, as metadata allows
# ("16*n" for the classifier, any size for the others; the traced hybrid network: its slice count, other in-plane
# sizes at the traced N and D).
EXPORT_INPUTS: dict[str, list[tuple[int, ...]]] = {
    "lvmmed_cls": [(2, 1, 32, 32), (1, 1, 48, 48)],
    "lvmmed_det": [(1, 64, 64), (1, 48, 80)],  # one list of two images of different sizes
    "lvmmed_hybrid3d": [(1, 1, 3, 16, 16), (1, 1, 3, 24, 20)],
    "lvmmed_seg": [(1, 1, 45, 37), (2, 1, 64, 64)],
}
# The released LVM-Med files each bundle fine-tunes from (init_weights), listed in its large_files.yml.
# lvmmed_pretrain trains its encoder (from random initialisation by default): no released file needed.
RELEASED_WEIGHTS: dict[str, tuple[str, ...]] = {
    "lvmmed_cls": ("lvmmed_resnet50", "lvmmed_vit_b"),
    "lvmmed_det": ("lvmmed_resnet50",),  # the detector's backbone is the ResNet-50 only
    "lvmmed_hybrid3d": ("lvmmed_resnet50", "lvmmed_vit_b"),
    "lvmmed_pretrain": (),
    "lvmmed_sam": ("lvmmed_vit_b",),  # SAM's image encoder is the ViT-B
    "lvmmed_seg": ("lvmmed_resnet50", "lvmmed_vit_b"),
}
LARGE_FILE_KEYS = {"path", "url", "hash_val", "hash_type"}


def _configs(bundle: str) -> Path:
    return REPO / "bundles" / bundle / "configs"


def _metadata(bundle: str) -> dict:
    return json.loads((_configs(bundle) / "metadata.json").read_text())


def _parser(bundle: str, overrides: dict[str, Any]) -> ConfigParser:
    """The bundle's network config with the metadata, as ckpt_export reads them, with ``overrides`` applied."""
    parser = ConfigParser()
    parser.read_config(str(_configs(bundle) / NET_CONFIG[bundle][1]))
    parser.read_meta(str(_configs(bundle) / "metadata.json"))
    for key, value in overrides.items():
        parser[key] = value
    return parser


# ---------------------------------------------------------------- verify_metadata


@pytest.mark.parametrize("bundle", BUNDLES)
def test_verify_metadata(bundle: str, tmp_path: Path) -> None:
    """metadata.json validates against the schema its URL names (the copy in the repository: no download);
    a copy without ``network_data_format`` does not, so the check is real."""
    meta = _metadata(bundle)
    assert meta["schema"].rsplit("/", 1)[-1] == SCHEMA.name
    verify_metadata(meta_file=str(_configs(bundle) / "metadata.json"), filepath=str(SCHEMA))
    del meta["network_data_format"]
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="'network_data_format' is a required property"):
        verify_metadata(meta_file=str(tmp_path / "metadata.json"), filepath=str(SCHEMA))


# ---------------------------------------------------------------- verify_net_in_out


@pytest.mark.parametrize("bundle", BUNDLES)
def test_verify_net_in_out(bundle: str, one_thread: None) -> None:
    """The network of the inference config takes metadata's input (channels, dtype, spatial shape at the zoo's
    default p = n = any = 1) and returns metadata's output channels and dtype."""
    if bundle in EXCLUDE_VERIFY_SHAPE:
        pytest.skip(f"excluded: {EXCLUDE_VERIFY_SHAPE[bundle]}")
    net_id, config = NET_CONFIG[bundle]
    verify_net_in_out(net_id=net_id, meta_file=str(_configs(bundle) / "metadata.json"),
                      config_file=str(_configs(bundle) / config), device="cpu",
                      bundle_root=str(REPO / "bundles" / bundle))
    out = _metadata(bundle)["network_data_format"]["outputs"]["pred"]
    with pytest.raises(ValueError, match="output channel number"):  # the check is real: a wrong count fails
        verify_net_in_out(net_id=net_id, meta_file=str(_configs(bundle) / "metadata.json"),
                          config_file=str(_configs(bundle) / config), device="cpu",
                          **{"_meta_#network_data_format#outputs#pred#num_channels": out["num_channels"] + 1})


def test_the_detector_cannot_be_verified_by_shape(one_thread: None) -> None:
    """The reason lvmmed_det is excluded holds: verify_net_in_out fails on its list-of-dicts output."""
    with pytest.raises(AttributeError, match="'list' object has no attribute 'shape'"):
        verify_net_in_out(net_id="network_def", meta_file=str(_configs("lvmmed_det") / "metadata.json"),
                          config_file=str(_configs("lvmmed_det") / "inference.yaml"), device="cpu", any=32)


def test_the_pretraining_bundle_has_no_network_to_verify_or_export(one_thread: None) -> None:
    """The reason lvmmed_pretrain is excluded holds: no inference config, no network_def, and its encoder
    returns a list of feature maps, not one tensor."""
    configs = _configs("lvmmed_pretrain")
    assert not list(configs.glob("inference.*"))
    parser = ConfigParser()
    parser.read_config(str(configs / "train.yaml"))
    assert "network_def" not in parser
    encoder = parser.get_parsed_content("encoder", instantiate=True).eval()
    with torch.no_grad():
        out = encoder(torch.rand(1, 3, 32, 32))
    assert isinstance(out, list) and len(out) == 5


# ---------------------------------------------------------------- ckpt_export


def _compare(bundle: str, scripted: torch.jit.ScriptModule, eager: torch.nn.Module) -> None:
    """The exported network's outputs equal the eager one's on ``EXPORT_INPUTS[bundle]``."""
    shapes = EXPORT_INPUTS[bundle]
    with torch.no_grad():
        if bundle == "lvmmed_det":
            images = [torch.rand(shape) for shape in shapes]
            expected, (_, got) = eager(images), scripted(images)  # a scripted detector returns (losses, detections)
            for e, s in zip(expected, got, strict=True):
                assert len(e["boxes"]) == 20  # score threshold 0: full lists to compare
                assert torch.equal(e["labels"], s["labels"])
                torch.testing.assert_close(s["boxes"], e["boxes"], atol=1e-4, rtol=0)
                torch.testing.assert_close(s["scores"], e["scores"], atol=1e-5, rtol=0)
            return
        channels = _metadata(bundle)["network_data_format"]["outputs"]["pred"]["num_channels"]
        for shape in shapes:
            x = torch.randn(shape)
            expected, got = eager(x), scripted(x)
            assert got.shape == expected.shape and got.shape[:2] == (shape[0], channels)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bundle", BUNDLES)
def test_ckpt_export(bundle: str, tmp_path: Path, one_thread: None) -> None:
    """ckpt_export writes TorchScript from a checkpoint of the network's own generated weights (as the zoo's
    ``_produce_fake_weights``), with metadata.json and the config inside; loaded back, it holds exactly the
    checkpoint's tensors and gives the eager network's outputs."""
    if bundle in EXCLUDE_TORCHSCRIPT:
        pytest.skip(f"excluded: {EXCLUDE_TORCHSCRIPT[bundle]}")
    net_id, config = NET_CONFIG[bundle]
    overrides = EXPORT_OVERRIDES.get(bundle, {})
    eager = _parser(bundle, overrides).get_parsed_content(net_id).eval()
    state = eager.state_dict()
    torch.save(state, tmp_path / "model.pt")
    torch.manual_seed(1)  # the network ckpt_export builds starts from other random weights than the checkpoint's
    ckpt_export(net_id, filepath=str(tmp_path / "model.ts"), ckpt_file=str(tmp_path / "model.pt"),
                meta_file=str(_configs(bundle) / "metadata.json"), config_file=str(_configs(bundle) / config),
                bundle_root=str(REPO / "bundles" / bundle), **EXPORT_OPTIONS.get(bundle, {}), **overrides)
    extra = {"metadata.json": "", f"{Path(config).stem}.json": ""}
    scripted = torch.jit.load(str(tmp_path / "model.ts"), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["version"] == _metadata(bundle)["version"]
    assert net_id in json.loads(extra[f"{Path(config).stem}.json"])
    exported = scripted.state_dict()
    assert exported.keys() == state.keys()
    assert all(torch.equal(exported[k], v) for k, v in state.items())
    _compare(bundle, scripted, eager)


def test_the_hybrid_network_does_not_script() -> None:
    """The reason lvmmed_hybrid3d exports traced holds: the zoo's plain ckpt_export (torch.jit.script) fails."""
    net = _parser("lvmmed_hybrid3d", {}).get_parsed_content("network_def").eval()
    with pytest.raises(Exception, match="InterSliceTransformer"):
        torch.jit.script(net)


def test_the_box_prompted_network_does_not_script() -> None:
    """The reason lvmmed_sam is excluded from ckpt_export holds: scripting fails in SAM's prompt encoder."""
    pytest.importorskip("segment_anything")
    net = _parser("lvmmed_sam", {"img_size": 32}).get_parsed_content("network_def").eval()
    with pytest.raises(RuntimeError, match="prompt_encoder.py"):
        torch.jit.script(net)


# ---------------------------------------------------------------- large_files.yml


@pytest.mark.parametrize("bundle", BUNDLES)
def test_large_files(bundle: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """large_files.yml lists the released LVM-Med files the bundle fine-tunes from, in the zoo's keys, under
    models/, with the registry's sha256 (empty where none is published); MONAI's ``download_large_files``
    reads it and would call ``download_url`` with arguments it accepts (stopped here: nothing is downloaded)."""
    import monai.bundle.scripts as scripts

    root = REPO / "bundles" / bundle
    found = sorted(p.name for p in root.glob("large_files.*"))
    if not RELEASED_WEIGHTS[bundle]:
        assert found == []
        return
    assert found == ["large_files.yml"]
    parser = ConfigParser()
    parser.read_config(str(root / "large_files.yml"))
    entries = parser.get()["large_files"]
    infos = [OFFICIAL_WEIGHTS[name] for name in RELEASED_WEIGHTS[bundle]]
    assert [e["path"] for e in entries] == [f"models/{info.filename}" for info in infos]
    for entry, info in zip(entries, infos, strict=True):
        assert set(entry) == LARGE_FILE_KEYS, entry
        assert entry["url"].startswith("https://") and entry["hash_type"] == "sha256"
        assert entry["hash_val"] == (info.sha256 or "")

    signature = inspect.signature(scripts.download_url)
    calls: list[dict] = []
    monkeypatch.setattr(scripts, "download_url", lambda **kw: calls.append(signature.bind(**kw).arguments))
    scripts.download_large_files(bundle_path=str(root))
    assert [Path(c["filepath"]) for c in calls] == [root / e["path"] for e in entries]
    assert [c["url"] for c in calls] == [e["url"] for e in entries]
    assert not list(root.glob("models/*"))  # nothing written


# ---------------------------------------------------------------- version, changelog


@pytest.mark.parametrize("bundle", BUNDLES)
def test_version_and_changelog(bundle: str) -> None:
    """metadata.json has a version (major.minor.patch) that is a key of its changelog, with a description, and
    no changelog entry is newer than it (the zoo's verify_version_changes)."""
    meta = _metadata(bundle)
    version, changelog = meta["version"], meta["changelog"]

    def key(v: str) -> tuple[int, ...]:
        parts = v.split(".")
        assert len(parts) == 3 and all(p.isdigit() for p in parts), v
        return tuple(int(p) for p in parts)

    assert version in changelog and changelog[version].strip()
    assert max(changelog, key=key) == version
