"""The lvmmed_hybrid3d bundle end to end on tiny settings (CPU; the model zoo's steps: test_model_zoo.py): the
three joint 2D-3D pretraining stages chained through their checkpoints (stage 1 on the loader that mixes slices
of many volumes, whose batches are checked against volumes that encode where each slice came from),
segmentation training -> inference (a NIfTI with the input's shape and affine, equal to the network's own
prediction), classification on volumes of different depths, and clear errors for bad data."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_helpers import causes as _causes_of
from bundle_helpers import ok as _ok
from bundle_helpers import run_bundle
from bundle_helpers import save_nifti as _save
from bundle_helpers import scalars as _scalars

from lvmmed_monai import load_encoder
from lvmmed_monai.data.loading import VolumeDataError
from lvmmed_monai.data.volumes import PadDepthCollate, classification_data, segmentation_data
from lvmmed_monai.data.writers import AtomicNibabelWriter
from lvmmed_monai.demo.phantoms import torso_ct
from lvmmed_monai.demo.volumes import add_nodule
from lvmmed_monai.engines import load_stage_checkpoint

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "bundles" / "lvmmed_hybrid3d" / "configs"
_run = functools.partial(run_bundle, CONFIGS)
TINY_INTER = {"dims": [32, 32, 64, 64], "num_heads": [2, 2, 4, 4]}
TINY = {"inter_kwargs": TINY_INTER, "num_workers": 0}
CKPT_KEYS = {"backbone", "criterion", "optimizer", "trainer", "rng"}


@pytest.fixture(scope="module")
def pretrained(module_tmp) -> dict:
    """Stages 1, 2, 3 of pretrain.yaml, 2 iterations each (2 generated 32 x 32 x 6 phantoms), each stage starting
    from the previous one's checkpoint folder (the default): stage 1 on the mixed slice loader (the default; 2
    epochs of one batch of 2 volumes x 3 slices), stages 2 and 3 on the volume loader (batch 1, 1 epoch)."""
    out = module_tmp("pretrain")
    over = {**TINY, "output_dir": str(out), "num_phantoms": 2, "phantom_shape": [32, 32, 6], "image_size": 32,
            "batch_size": 1, "max_epochs": 1, "num_prototypes": 16, "hidden_dim": 64, "ckpt_interval": 1,
            "volumes_per_batch": 2, "slices_per_volume": 3}
    stage_over = {1: {"max_epochs": 2}, 2: {}, 3: {}}
    logs = {stage: _ok(_run("pretrain.yaml", {**over, **stage_over[stage], "stage": stage})) for stage in (1, 2, 3)}
    return {"out": out, "logs": logs}


def test_pretraining_stages_train_their_parts_and_chain_through_checkpoints(pretrained):
    out = pretrained["out"]
    assert len(list((out / "default_data" / "images").glob("*.nii.gz"))) == 2
    final = {}
    for stage, term in ((1, "intra"), (2, "mask"), (3, "inter")):
        ckpts = out / f"stage{stage}" / "checkpoints"
        assert sorted(p.name for p in ckpts.glob("*.pt")) == [
            "checkpoint_final_iteration=2.pt", "checkpoint_iteration=1.pt", "checkpoint_iteration=2.pt"]
        final[stage] = torch.load(ckpts / "checkpoint_final_iteration=2.pt", weights_only=True)
        assert set(final[stage]) == CKPT_KEYS and final[stage]["trainer"]["iteration"] == 2
        loss = _scalars(out / f"stage{stage}" / "logs", term)  # the stage's own term of the paper
        assert sorted(loss) == [1, 2] and all(np.isfinite(v) and v > 0 for v in loss.values())
        exported = torch.load(out / f"stage{stage}" / "models" / "hybrid_backbone.pt", weights_only=True)
        assert all(torch.equal(v, final[stage]["backbone"][k]) for k, v in exported.items())
        encoder = load_encoder("lvmmed_resnet50", in_channels=1,
                               weights=out / f"stage{stage}" / "models" / "lvmmed_resnet.torch")
        assert encoder.load_report.ok
        if stage > 1:
            assert f"started from {out / f'stage{stage - 1}' / 'checkpoints'}" in pretrained["logs"][stage].stdout
        # stage 1's mixed loader: one batch of both volumes per epoch; stages 2 and 3: one volume per batch
        epochs = json.loads((out / f"stage{stage}" / "report.json").read_text())["epochs"]
        assert [(e["epoch"], e["iteration"]) for e in epochs] == ([(1, 1), (2, 2)] if stage == 1 else [(1, 2)])

    def part(stage: int, prefix: str) -> dict:
        return {k: v for k, v in final[stage]["backbone"].items() if k.startswith(prefix)}

    def same(a: dict, b: dict) -> bool:
        return all(torch.equal(a[k], b[k]) for k in a)

    # stage 2 starts from stage 1 and keeps f_intra (BatchNorm statistics included) frozen; f_inter trains
    assert same(part(2, "encoder."), part(1, "encoder.")) and not same(part(2, "inter."), part(1, "inter."))
    # stage 3 trains both
    assert not same(part(3, "encoder."), part(2, "encoder.")) and not same(part(3, "inter."), part(2, "inter."))


def _coded_volumes(folder: Path, count: int = 6, depth: int = 5, size: int = 8) -> Path:
    """``count`` volumes ``(size, size, depth)``, zero but for one voxel per slice: slice ``z`` of volume ``v``
    has a 1 at in-plane ``(v, z)``, so the bright pixel of any slice the loader gives says where it came from."""
    for v in range(count):
        volume = np.zeros((size, size, depth))
        volume[v, np.arange(depth), np.arange(depth)] = 1
        _save(volume, folder / f"v{v}.nii.gz")
    return folder


def _provenance(views: torch.Tensor) -> list[tuple[int, int]]:
    """``(volume, slice)`` of each depth-1 item of ``views (N, 1, 1, H, W)``: its bright pixel's position."""
    flat = views.reshape(views.shape[0], -1).argmax(1)
    return [(int(i) // views.shape[-1], int(i) % views.shape[-1]) for i in flat]


# augmentations off: each view is its slice, normalised; the window keeps the single bright voxel of a slice
PLAIN_VIEWS = {"rotate_range": 0.0, "scale_range": 0.0, "translate_range": 0.0, "flip_prob": 0.0,
               "intensity_scale": 0.0, "intensity_shift": 0.0, "contrast_gamma": [1.0, 1.0], "noise_std": 0.0,
               "intensity_percentiles": [0, 100]}


def _first_batch(data: Path, tmp_path: Path, **overrides) -> dict:
    """The first batch of pretrain.yaml's training DataLoader on ``data`` (the config parsed in-process)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "pretrain.yaml"))
    parser.update({"data": str(data), "output_dir": str(tmp_path / "out"), "image_size": 8, **overrides})
    return next(iter(parser.get_parsed_content("train#dataloader")))


def test_stage1_batches_mix_single_slices_of_many_volumes_each_with_its_own_two_views(tmp_path):
    data = _coded_volumes(tmp_path / "data")
    # 4 of the 6 volumes x 7 slices each (more than their 5: drawn with replacement)
    batch = _first_batch(data, tmp_path, volumes_per_batch=4, slices_per_volume=7, **PLAIN_VIEWS)
    assert batch["view_s"].shape == batch["view_t"].shape == (28, 1, 1, 8, 8)
    assert batch["lengths"].tolist() == [1] * 28
    torch.testing.assert_close(batch["view_s"], batch["view_t"], rtol=0, atol=0)  # both views from one slice
    source = _provenance(batch["view_s"])
    assert all(v < 6 and z < 5 for v, z in source)  # each item is a real slice (v, z) of volume v
    volumes = [v for v, _ in source]
    assert len(set(volumes)) == 4 and all(volumes.count(v) == 7 for v in set(volumes))
    # with the view augmentations on (the defaults), each view of an item gets its own draw
    batch = _first_batch(data, tmp_path, volumes_per_batch=4, slices_per_volume=7)
    assert not torch.equal(batch["view_s"], batch["view_t"])
    # stage 2 (and stage 1 with stage1_loader volumes) keeps the volume loader: runs of consecutive slices
    for over in ({"stage": 2}, {"stage1_loader": "Volumes"}):
        batch = _first_batch(data, tmp_path, batch_size=2, max_slices=3, **PLAIN_VIEWS, **over)
        assert batch["view_s"].shape == (2, 1, 3, 8, 8) and batch["lengths"].tolist() == [3, 3]
        for volume in batch["view_s"]:
            source = _provenance(volume.transpose(0, 1))
            assert len({v for v, _ in source}) == 1 and np.diff([z for _, z in source]).tolist() == [1, 1]


@pytest.mark.parametrize("overrides, error, message", [
    ({"slices_per_volume": 0}, ValueError, "slices_per_volume must be an integer >= 1, got 0"),
    ({"volumes_per_batch": 7}, VolumeDataError, "volumes_per_batch=7 but the data has 6 volume(s): set "
                                                "--volumes_per_batch 6 or fewer, give more volumes, or use "
                                                "--stage1_loader volumes"),
    ({"volumes_per_batch": 0}, ValueError, "volumes_per_batch must be an integer >= 1, got 0"),
    ({"stage1_loader": "slices"}, ValueError, "stage1_loader must be one of ['volumes', 'mixed'], got 'slices'"),
])
def test_mixed_slice_loader_knobs_fail_clearly(tmp_path, overrides, error, message):
    data = _coded_volumes(tmp_path / "data")
    with pytest.raises(RuntimeError) as info:
        _first_batch(data, tmp_path, **overrides)
    cause = _causes_of(info.value)[-1]
    assert isinstance(cause, error) and message in str(cause), _causes_of(info.value)
    if "volumes_per_batch" in overrides:  # the volume loader of stage 2 does not read it
        assert _first_batch(data, tmp_path, stage=2, **overrides)["view_s"].shape[0] == 2


def test_stage_without_previous_checkpoint_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*stage1.*run the previous step first"):
        load_stage_checkpoint(tmp_path / "stage1" / "checkpoints", {})


@pytest.fixture(scope="module")
def segmentation(module_tmp, pretrained) -> Path:
    """train_seg.yaml from the stage-3 backbone: 4 generated phantoms (3 train, 1 val), batch 2, 1 epoch."""
    out = module_tmp("seg")
    _ok(_run("train_seg.yaml", {
        **TINY, "output_dir": str(out), "num_phantoms": 4, "phantom_shape": [32, 32, 6], "roi_size": [6, 32, 32],
        "batch_size": 2, "max_epochs": 1,
        "pretrained": str(pretrained["out"] / "stage3" / "models" / "hybrid_backbone.pt")}))
    return out


def test_segmentation_training_writes_best_and_last_model_and_per_class_dice(segmentation, pretrained):
    models = segmentation / "models"
    assert sorted(p.name for p in models.iterdir()) == ["model_best.pt", "model_final.pt"]
    state = torch.load(models / "model_final.pt", weights_only=True)
    start = torch.load(pretrained["out"] / "stage3" / "models" / "hybrid_backbone.pt", weights_only=True)
    # fine-tuning started from the pretrained f_intra + f_inter: 2 Adam steps of lr 1e-4 move a weight <= ~2e-4
    mapped = {k.replace("encoder.", "net2d.encoder.", 1) if k.startswith("encoder.") else k: v
              for k, v in start.items() if "running_" not in k and "num_batches" not in k}
    assert len(mapped) > 200 and all(torch.allclose(state[k], v, atol=1e-3) for k, v in mapped.items())
    assert sorted(_scalars(segmentation / "logs", "train_loss")) == [1, 2]
    for tag in ("val_mean_dice", "val_dice_1", "val_dice_2"):
        assert list(_scalars(segmentation / "logs", tag)) == [1], tag
        assert 0.0 <= _scalars(segmentation / "logs", tag)[1] <= 1.0


def _preprocessed(volume: np.ndarray) -> torch.Tensor:
    """What the bundle feeds the network, computed by hand: percentile window -> [0, 1], the encoder's mean and
    std, slice axis first: ``(1, 1, Z, X, Y)``."""
    from monai.transforms import ScaleIntensityRangePercentiles

    from lvmmed_monai.engines import input_normalization

    mean, std = (sum(v) / 3 for v in input_normalization("lvmmed_resnet50"))
    x = ScaleIntensityRangePercentiles(0.5, 99.5, 0.0, 1.0, clip=True)(torch.as_tensor(volume, dtype=torch.float32))
    return ((torch.as_tensor(x) - mean) / std).permute(2, 0, 1)[None, None]


def _calibrated_network(x: torch.Tensor, path: Path) -> np.ndarray:
    """A random network whose BatchNorm statistics are those of ``x`` (so that its labels vary over the volume),
    saved to ``path``; returns its label map in the input's axes (the oracle for the inference config)."""
    from lvmmed_monai.networks import LVMMedHybridSegNet

    net = LVMMedHybridSegNet(1, 3, inter_kwargs=TINY_INTER)
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = 1.0
    with torch.no_grad():
        net.train()(x)
        labels = net.eval()(x)[0].argmax(0).permute(1, 2, 0).numpy()
    torch.save(net.state_dict(), path)
    return labels


def test_inference_writes_a_nifti_with_the_input_shape_and_affine(segmentation, tmp_path):
    affine = np.array([[0, -0.7, 0, 10.0], [0.9, 0, 0, -5.0], [0, 0, 3.0, 2.0], [0, 0, 0, 1]])
    volume = torso_ct(np.random.default_rng(1), (30, 34, 7)).astype(np.int16)
    source = _save(volume, tmp_path / "in" / "case.nii.gz", affine)
    expected = _calibrated_network(_preprocessed(volume), tmp_path / "calibrated.pt")
    assert len(np.unique(expected)) == 3
    runs = {  # the full volume with the oracle network; windows with the model of train_seg.yaml
        "full": {"checkpoint": str(tmp_path / "calibrated.pt")},
        "windows": {"train_dir": str(segmentation), "sliding_window": True, "roi_size": [4, 24, 24]},
    }
    for mode, extra in runs.items():
        out = tmp_path / mode
        _ok(_run("inference_seg.yaml", {**TINY, "data": str(source), "output_dir": str(out), **extra}))
        assert [p.name for p in out.iterdir()] == ["case_seg.nii.gz"]  # no temporary file left behind
        pred = nib.load(out / "case_seg.nii.gz")
        assert pred.shape == volume.shape and pred.get_data_dtype() == np.uint8
        np.testing.assert_allclose(pred.affine, affine, atol=1e-6)
        np.testing.assert_allclose(pred.header.get_zooms(), (0.9, 0.7, 3.0), atol=1e-6)
        labels = np.asarray(pred.dataobj)
        assert set(np.unique(labels)) <= {0, 1, 2}
        if mode == "full":  # the saved map is the network's prediction, in the input's axes
            assert (labels != expected).mean() < 1e-3


def test_atomic_writer_leaves_nothing_when_writing_fails(tmp_path, monkeypatch):
    writer = AtomicNibabelWriter()
    writer.set_data_array(torch.zeros(1, 4, 4, 3), channel_dim=0)
    writer.set_metadata({"affine": np.eye(4)})

    def broken(img, filename):
        Path(filename).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        writer.write(tmp_path / "out_seg.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_classification_on_volumes_of_different_depths(tmp_path):
    rng = np.random.default_rng(0)
    for cls, depths in (("normal", (4, 5, 6)), ("nodule", (5, 6, 7))):
        for i, depth in enumerate(depths):
            vol = torso_ct(rng, (32, 32, depth))
            _save(add_nodule(vol, rng) if cls == "nodule" else vol, tmp_path / "data" / cls / f"v{i}.nii.gz")
    out = tmp_path / "out"
    _ok(_run("train_cls.yaml", {
        **TINY, "data": str(tmp_path / "data"), "class_names": ["normal", "nodule"], "output_dir": str(out),
        "image_size": 32, "batch_size": 2, "max_epochs": 1, "hidden_dim": 16, "val_fraction": 0.3}))
    assert sorted(p.name for p in (out / "models").iterdir()) == ["model_best.pt", "model_final.pt"]
    assert sorted(_scalars(out / "logs", "train_loss")) == [1, 2]  # 4 training volumes, batch 2
    assert 0.0 <= _scalars(out / "logs", "val_accuracy")[1] <= 1.0


def test_padded_batches_carry_the_real_depths():
    batch = PadDepthCollate(["image"])([{"image": torch.ones(1, 3, 4, 4), "label": 0},
                                        {"image": torch.ones(1, 5, 4, 4), "label": 1}])
    assert batch["image"].shape == (2, 1, 5, 4, 4) and batch["lengths"].tolist() == [3, 5]
    assert batch["image"][0, :, 3:].abs().sum() == 0 and batch["label"].tolist() == [0, 1]
    # lists of samples (RandSpatialCropSamplesd's) are flattened in order, as MONAI's list_data_collate does
    samples = [[{"image": torch.full((1, 1, 4, 4), float(v * 10 + i))} for i in range(3)] for v in range(2)]
    batch = PadDepthCollate(["image"])(samples)
    assert batch["image"][:, 0, 0, 0, 0].tolist() == [0, 1, 2, 10, 11, 12] and batch["lengths"].tolist() == [1] * 6


def test_generated_data_sets(tmp_path):
    cls = classification_data(None, tmp_path / "cls", num_phantoms=4, phantom_shape=(32, 32, 6), num_classes=2)
    assert cls["classes"] == ["normal", "nodule"]
    assert sorted(e["label"] for e in cls["train"]) == [0, 1] and sorted(e["label"] for e in cls["val"]) == [0, 1]
    seg = segmentation_data(None, tmp_path / "seg", num_phantoms=4, phantom_shape=(32, 32, 6))
    assert len(seg["train"]) == 3 and len(seg["val"]) == 1
    label = np.asarray(nib.load(seg["train"][0]["label"]).dataobj)
    assert set(np.unique(label)) == {0, 1, 2}


def test_segmentation_pairs_match_by_name_with_nnunet_channel_suffixes(tmp_path):
    for name in ("imagesTr/liver_0000.nii.gz", "imagesTr/scan_0001_0000.nii.gz", "labelsTr/liver.nii.gz",
                 "labelsTr/scan_0001.nii.gz", "other/images/scan_0001.nii.gz", "other/images/scan_0002.nii.gz",
                 "other/labels/scan_0001.nii.gz"):
        _save(np.zeros((8, 8, 3)), tmp_path / name, dtype=np.uint8)
    pairs = segmentation_data(tmp_path, tmp_path / "unused", val_data=tmp_path, num_phantoms=1)["train"]
    assert [(Path(p["image"]).name, Path(p["label"]).name) for p in pairs] == [
        ("liver_0000.nii.gz", "liver.nii.gz"), ("scan_0001_0000.nii.gz", "scan_0001.nii.gz")]
    with pytest.raises(VolumeDataError, match=r"1 image\(s\) in .*images have no label .*scan_0002"):
        segmentation_data(tmp_path / "other", tmp_path / "unused")


def test_label_of_another_shape_fails_with_a_clear_message(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(2):
        _save(torso_ct(rng, (32, 32, 6)), tmp_path / "data" / "images" / f"case{i}.nii.gz")
        _save(np.zeros((32, 32, 6 - i)), tmp_path / "data" / "labels" / f"case{i}.nii.gz", dtype=np.uint8)
    with pytest.raises(VolumeDataError, match=r"case1\.nii\.gz has shape \[32, 32, 5\] but its image"):
        segmentation_data(tmp_path / "data", tmp_path / "unused")
    proc = _run("train_seg.yaml", {"data": str(tmp_path / "data"), "output_dir": str(tmp_path / "out")})
    assert proc.returncode != 0
    assert "VolumeDataError: label" in proc.stderr and "has shape [32, 32, 5] but its image" in proc.stderr, \
        proc.stderr[-3000:]


def test_empty_data_folder_fails_with_a_clear_message(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = _run("pretrain.yaml", {"data": str(tmp_path / "empty"), "output_dir": str(tmp_path / "out")})
    assert proc.returncode != 0
    assert f"VolumeDataError: no volume files under {tmp_path / 'empty'}" in proc.stderr, proc.stderr[-3000:]
