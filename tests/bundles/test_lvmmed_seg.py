"""The lvmmed_seg bundle end to end on tiny settings (CPU): network shapes of train.yaml and of the ViT (the model
zoo's steps on the default network: test_model_zoo.py), training from LVM-Med
weights on generated volumes (2 iterations, checkpoints, per-class Dice and IoU), the model zoo's ckpt_export of
the trained model to TorchScript (same outputs as the eager network), training on mixed 2D images +
3D volumes with the ViT, inference on NIfTI / DICOM / PNG inputs (the network's own slice-by-slice prediction,
the input's shape and affine, atomic files), evaluation metrics equal to MONAI's ``compute_dice`` /
``compute_iou`` on whole volumes, and clear errors with nothing written for bad inputs."""

from __future__ import annotations

import csv
import functools
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_helpers import ENV, run_bundle
from bundle_helpers import fails as _fails
from bundle_helpers import ok as _ok
from bundle_helpers import save_nifti as _save
from bundle_helpers import scalars as _scalars
from monai.metrics import compute_dice, compute_iou
from monai.transforms import LoadImage, ScaleIntensityRangePercentiles
from PIL import Image

from lvmmed_monai.data.loading import MatchChannelsd, VolumeDataError
from lvmmed_monai.data.segmentation import (
    RandSliceSamplesd,
    check_labels,
    inference_datalist,
    input_stats,
    labeled_data,
)
from lvmmed_monai.data.writers import AtomicPILWriter
from lvmmed_monai.demo import write_phantom_images
from lvmmed_monai.demo.phantoms import _write_dicom_series, torso_ct
from lvmmed_monai.demo.volumes import torso_labels, write_phantom_volumes
from lvmmed_monai.inference import SliceOrImageInferer
from lvmmed_monai.networks import segmentation_net_2d

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "bundles" / "lvmmed_seg" / "configs"
_run = functools.partial(run_bundle, CONFIGS)
TINY = {"num_workers": 0, "progress_bar": False}
AFFINE = np.array([[0, -0.7, 0, 10.0], [0.9, 0, 0, -5.0], [0, 0, 3.0, 2.0], [0, 0, 0, 1]])


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ---------------------------------------------------------------- network shapes


def test_network_shapes_verify_in_train_config_and_for_the_vit():
    """metadata's network_data_format holds for train.yaml's network too, and for the ViT (inference.yaml's
    default network: test_model_zoo.py)."""
    from monai.bundle import verify_net_in_out

    # U-Net on a (1, 1, 20, 20) image: (1, 3, 20, 20) logits
    verify_net_in_out(net_id="network_def", meta_file=str(CONFIGS / "metadata.json"),
                      config_file=str(CONFIGS / "train.yaml"), device="cpu", any=20)
    verify_net_in_out(net_id="network_def", meta_file=str(CONFIGS / "metadata.json"),
                      config_file=str(CONFIGS / "inference.yaml"), device="cpu", any=32,
                      encoder_name="lvmmed_vit_b", net_kwargs={"img_size": 32, "feature_size": 8})


# ---------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained(module_tmp, r50_file) -> Path:
    """train.yaml from the official-layout ResNet-50 weights: 4 generated 32 x 32 x 6 volumes (3 train, 1 val),
    2 slices each, batch 3 volumes, 2 epochs of 1 iteration."""
    out = module_tmp("seg")
    _ok(_run("train.yaml", {**TINY, "output_dir": str(out), "num_phantoms": 4, "phantom_shape": [32, 32, 6],
                            "patch_size": [32, 32], "slices_per_volume": 2, "batch_size": 3, "max_epochs": 2,
                            "init_weights": r50_file, "class_names": ["background", "lung", "bone"]}))
    return out


def test_training_writes_best_and_final_model_and_per_class_dice_and_iou(trained, r50_state):
    models = trained / "models"
    assert _files(models) == ["model_best.pt", "model_final.pt"]  # atomic saves: no temporary file left
    state = torch.load(models / "model_final.pt", weights_only=True)
    # fine-tuning started from the LVM-Med weights: 2 Adam steps of lr 1e-4 move a weight by <= ~2e-4
    start = {f"encoder.{k}": v for k, v in r50_state.items()  # conv1: RGB kernels summed for 1 channel
             if not k.startswith(("fc.", "conv1.")) and "running_" not in k and "num_batches" not in k}
    assert len(start) > 150 and all(torch.allclose(state[k], v, atol=1e-3) for k, v in start.items())
    assert sorted(_scalars(trained / "logs", "train_loss")) == [1, 2]
    for tag in ("val_mean_dice", "val_mean_iou", "val_dice_lung", "val_dice_bone", "val_iou_lung", "val_iou_bone"):
        values = _scalars(trained / "logs", tag)
        assert sorted(values) == [1, 2] and all(0.0 <= v <= 1.0 for v in values.values()), tag


def test_ckpt_export_writes_torchscript_with_the_eager_networks_outputs(trained, tmp_path):
    """The model zoo's check, as its CI runs it: the trained checkpoint through ``ckpt_export`` (torch.jit.script)."""
    exported = tmp_path / "model.ts"
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath",
                           str(exported), "--ckpt_file", str(trained / "models" / "model_best.pt"), "--meta_file",
                           str(CONFIGS / "metadata.json"), "--config_file", str(CONFIGS / "inference.yaml")],
                          capture_output=True, encoding="utf-8", errors="replace", env=ENV, timeout=300, cwd=REPO)
    _ok(proc)
    extra = {"metadata.json": "", "inference.json": ""}
    scripted = torch.jit.load(str(exported), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["version"] == "0.1.0" and "network_def" in json.loads(
        extra["inference.json"])
    net = segmentation_net_2d("lvmmed_resnet50", 1, 3)
    net.load_state_dict(torch.load(trained / "models" / "model_best.pt", weights_only=True))
    net.eval()
    with torch.no_grad():
        for shape in ((1, 1, 45, 37), (2, 1, 64, 64)):  # padded to the stride 32 and cropped back; and not
            x = torch.randn(shape)
            expected = net(x)
            assert scripted(x).shape == expected.shape == (shape[0], 3, *shape[2:])
            assert torch.allclose(scripted(x), expected, atol=1e-5)


def test_the_vit_network_scripts_too():
    """ckpt_export of a ViT model scripts the same way (not run end to end here: its file is ~350 MB)."""
    net = segmentation_net_2d("lvmmed_vit_b", 1, 3, img_size=32, feature_size=8).eval()
    scripted = torch.jit.script(net)
    x = torch.randn(1, 1, 37, 45)  # padded to multiples of 16 and cropped back
    with torch.no_grad():
        assert torch.allclose(scripted(x), net(x), atol=1e-5)


def test_vit_on_mixed_2d_images_and_3d_volumes(tmp_path):
    images = write_phantom_images(tmp_path / "png", num_images=2, size=32, seed=1)
    volumes = write_phantom_volumes(tmp_path / "nii", "segmentation", 2, (32, 32, 5), seed=1)
    data = [{"image": str(root / "images" / name), "label": str(root / "labels" / name)}
            for root, names in ((images, ["phantom_00.png", "phantom_01.png"]),
                                (volumes, ["torso_00.nii.gz", "torso_01.nii.gz"])) for name in names]
    out = tmp_path / "out"
    _ok(_run("train.yaml", {**TINY, "data": data[:3], "val_data": data[3:], "output_dir": str(out),
                            "encoder_name": "lvmmed_vit_b", "net_kwargs": {"img_size": 32, "feature_size": 8},
                            "patch_size": [32, 32], "slices_per_volume": 2, "batch_size": 3, "max_epochs": 1}))
    assert _files(out / "models") == ["model_best.pt", "model_final.pt"]
    assert sorted(_scalars(out / "logs", "train_loss")) == [1]  # 2 images + 2 slices of one volume: 1 batch
    assert 0.0 <= _scalars(out / "logs", "val_mean_dice")[1] <= 1.0


def test_slice_samples_of_volumes_and_images():
    sampler = RandSliceSamplesd(["image", "label"], slice_axis=1, num_samples=3).set_random_state(0)
    volume = torch.arange(4 * 5 * 6.0).reshape(1, 4, 5, 6)
    samples = sampler({"image": volume, "label": volume.clone()})
    assert len(samples) == 3
    for s in samples:
        assert s["image"].shape == (1, 4, 6) and torch.equal(s["image"], s["label"])
        assert any(torch.equal(s["image"], volume[:, :, j]) for j in range(5))  # a real slice along axis 1
    image = {"image": torch.rand(1, 7, 9), "label": torch.zeros(1, 7, 9)}
    assert [tuple(s["image"].shape) for s in sampler(image)] == [(1, 7, 9)]
    grey = MatchChannelsd("image", 1)({"image": torch.stack([torch.ones(2, 2), 2 * torch.ones(2, 2),
                                                              3 * torch.ones(2, 2)])})["image"]
    assert grey.shape == (1, 2, 2) and torch.all(grey == 2)


# ---------------------------------------------------------------- inference and evaluation


def _preprocessed(array: np.ndarray) -> torch.Tensor:
    """What the configs feed the network, by hand: percentile window -> [0, 1], the encoder's mean and std."""
    mean, std = (v[0] for v in input_stats("lvmmed_resnet50", 1))
    x = ScaleIntensityRangePercentiles(0.5, 99.5, 0.0, 1.0, clip=True)(torch.as_tensor(array, dtype=torch.float32))
    return (torch.as_tensor(x) - mean) / std


def _slice_loop_labels(net: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """The oracle: the network on one 2D slice at a time, argmax; ``x`` (X, Y) or (X, Y, Z)."""
    with torch.no_grad():
        if x.ndim == 2:
            return net(x[None, None])[0].argmax(0).numpy()
        return torch.stack([net(x[None, None, :, :, z])[0].argmax(0) for z in range(x.shape[-1])], -1).numpy()


@pytest.fixture(scope="module")
def calibrated(module_tmp) -> dict:
    """A random U-Net whose BatchNorm statistics are those of a test volume's slices (so its labels vary over
    the volume), saved as a checkpoint; the volume (with its phantom labels) and a PNG image with labels."""
    root = module_tmp("calibrated")
    volume = torso_ct(np.random.default_rng(1), (30, 34, 7)).astype(np.int16)
    x = _preprocessed(volume)
    torch.manual_seed(0)
    net = segmentation_net_2d("lvmmed_resnet50", 1, 3)
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = 1.0
    with torch.no_grad():
        net.train()(x.permute(2, 0, 1)[:, None])
    net.eval()
    torch.save(net.state_dict(), root / "model.pt")
    png = Image.fromarray(((volume[:, :, 3] + 1000) / 8).clip(0, 255).astype(np.uint8).T)
    return {"root": root, "net": net, "volume": volume, "x": x, "png": png,
            "png_labels": torso_labels(volume[:, :, 3].astype(np.float64)).T}


def test_inference_writes_the_slice_by_slice_prediction_with_the_input_shape_and_affine(calibrated, tmp_path):
    source = tmp_path / "in"
    _save(calibrated["volume"], source / "case.nii.gz", AFFINE)
    calibrated["png"].save(source / "photo.png")
    series = torso_ct(np.random.default_rng(2), (24, 20, 4))
    _write_dicom_series(series, source / "series")
    expected = _slice_loop_labels(calibrated["net"], calibrated["x"])
    assert len(np.unique(expected)) == 3
    out = tmp_path / "out"
    _ok(_run("inference.yaml", {**TINY, "data": str(source), "output_dir": str(out),
                                "checkpoint": str(calibrated["root"] / "model.pt"), "sw_batch_size": 3}))
    # one label map per input, no temporary file left behind
    assert _files(out) == ["case_seg.nii.gz", "photo_seg.nii.gz", "series_seg.nii.gz"]
    pred = nib.load(out / "case_seg.nii.gz")
    assert pred.shape == calibrated["volume"].shape and pred.get_data_dtype() == np.uint8
    np.testing.assert_allclose(pred.affine, AFFINE, atol=1e-6)
    np.testing.assert_allclose(pred.header.get_zooms(), (0.9, 0.7, 3.0), atol=1e-6)
    assert (np.asarray(pred.dataobj) == expected).mean() > 0.999  # the network's own slice-by-slice labels
    dicom = LoadImage(image_only=True)(str(source / "series"))
    seg = nib.load(out / "series_seg.nii.gz")
    assert seg.shape == tuple(dicom.shape)
    np.testing.assert_allclose(seg.affine, np.asarray(dicom.affine), atol=1e-5)
    assert nib.load(out / "photo_seg.nii.gz").shape == calibrated["png"].size  # MONAI's (W, H) array order


def test_2d_inputs_can_be_written_as_png_atomically(tmp_path, monkeypatch):
    from monai.transforms import SaveImage

    labels = torch.tensor(np.random.default_rng(0).integers(0, 3, (1, 9, 7)), dtype=torch.uint8)
    save = SaveImage(output_dir=tmp_path, output_ext=".png", output_dtype=np.uint8, resample=False,
                     separate_folder=False, print_log=False, writer=AtomicPILWriter)
    save(labels, meta_data={"filename_or_obj": "img.png"})
    written = np.asarray(Image.open(tmp_path / "img_trans.png"))
    assert written.shape == (7, 9) and np.array_equal(written.T, labels[0].numpy())
    assert _files(tmp_path) == ["img_trans.png"]

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken)
    with pytest.raises(RuntimeError, match="disk full"):  # SaveImage reports its writer's error
        save(labels, meta_data={"filename_or_obj": "other.png"})
    assert _files(tmp_path) == ["img_trans.png"]
    with pytest.raises(VolumeDataError, match=r"output_ext \.png writes 2D label maps.*use --output_ext \.nii\.gz"):
        inference_datalist([str(_save(np.zeros((8, 8, 3)), tmp_path / "v.nii.gz"))], tmp_path, ".png")


def test_evaluation_metrics_equal_monai_compute_dice_and_iou_on_whole_volumes(calibrated, tmp_path):
    data = tmp_path / "data"
    volume = calibrated["volume"]
    _save(volume, data / "images" / "case.nii.gz", AFFINE)
    _save(torso_labels(volume.astype(np.float64)), data / "labels" / "case.nii.gz", AFFINE, np.uint8)
    calibrated["png"].save(data / "images" / "photo.png")
    Image.fromarray(calibrated["png_labels"]).save(data / "labels" / "photo.png")
    out = tmp_path / "eval"
    _ok(_run("evaluate.yaml", {**TINY, "data": str(data), "output_dir": str(out),
                               "checkpoint": str(calibrated["root"] / "model.pt"),
                               "class_names": ["background", "lung", "bone"]}))
    assert _files(out) == ["metrics.csv", "metrics.json"]
    rows = {Path(r["case"]).name: r for r in csv.DictReader(open(out / "metrics.csv"))}
    report = json.loads((out / "metrics.json").read_text())
    assert report["num_cases"] == 2 and set(rows) == {"case.nii.gz", "photo.png", "mean"}

    def onehot(labels: np.ndarray) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.as_tensor(labels, dtype=torch.long), 3).movedim(-1, 0)[None]

    x_png = _preprocessed(np.asarray(LoadImage(image_only=True)(str(data / "images" / "photo.png"))))
    y_png = np.asarray(LoadImage(image_only=True)(str(data / "labels" / "photo.png")))
    cases = {"case.nii.gz": (_slice_loop_labels(calibrated["net"], calibrated["x"]),
                             torso_labels(volume.astype(np.float64))),
             "photo.png": (_slice_loop_labels(calibrated["net"], x_png), y_png)}
    all_dice = []
    for name, (pred, label) in cases.items():
        # the whole (reassembled) volume at once, foreground classes
        dice = compute_dice(onehot(pred), onehot(label), include_background=False)[0]
        iou = compute_iou(onehot(pred), onehot(label), include_background=False)[0]
        all_dice.append(dice)
        for c, cls in enumerate(("lung", "bone")):
            for metric, values in (("dice", dice), ("iou", iou)):
                expected = float(values[c])
                written = rows[name][f"{metric}_{cls}"]
                if np.isnan(expected):
                    assert written == ""
                else:
                    assert float(written) == pytest.approx(expected, abs=1e-5), (name, metric, cls)
        assert float(rows[name]["dice_mean"]) == pytest.approx(float(dice.nanmean()), abs=1e-5)
    expected_mean = float(torch.stack(all_dice).nanmean())
    assert float(rows["mean"]["dice_mean"]) == pytest.approx(expected_mean, abs=1e-5)
    assert report["mean"]["dice_mean"] == pytest.approx(expected_mean, abs=1e-5)
    assert 0.0 < expected_mean < 1.0


def test_slice_inferer_equals_the_slice_loop_on_any_axis(calibrated):
    x = calibrated["x"][None, None]
    net = calibrated["net"]
    with torch.no_grad():
        for axis in (0, 1, 2):
            out = SliceOrImageInferer(slice_axis=axis, sw_batch_size=4)(x, net)
            loop = torch.stack([net(x.select(axis + 2, i)) for i in range(x.shape[axis + 2])], axis + 2)
            assert out.shape == (1, 3, *x.shape[2:]) and torch.allclose(out, loop, atol=1e-4)
        image = x[..., 0]
        assert torch.allclose(SliceOrImageInferer()(image, net), net(image), atol=1e-5)


# ---------------------------------------------------------------- bad inputs


def test_label_of_another_shape_fails_before_anything_is_written(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(2):
        _save(torso_ct(rng, (32, 32, 6)), tmp_path / "data" / "images" / f"case{i}.nii.gz")
        _save(np.zeros((32, 32, 6 - i)), tmp_path / "data" / "labels" / f"case{i}.nii.gz", dtype=np.uint8)
    out = tmp_path / "out"
    _fails(_run("train.yaml", {"data": str(tmp_path / "data"), "output_dir": str(out)}),
           "VolumeDataError: label", "case1.nii.gz has shape [32, 32, 5] but its image")
    assert not out.exists()
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((12, 10), np.uint8)).save(tmp_path / "a_label.png")
    with pytest.raises(VolumeDataError, match=r"a_label\.png has shape \[10, 12\] but its image .* has \[12, 10\]"):
        labeled_data([{"image": str(tmp_path / "a.png"), "label": str(tmp_path / "a_label.png")}], tmp_path, 3)


def test_unknown_label_values_fail_before_anything_is_written(tmp_path):
    label = np.zeros((16, 16, 4), np.uint8)
    label[2:5, 2:5, 1] = 5
    _save(np.ones((16, 16, 4)), tmp_path / "data" / "images" / "case.nii.gz")
    _save(label, tmp_path / "data" / "labels" / "case.nii.gz", dtype=np.uint8)
    out = tmp_path / "out"
    _fails(_run("evaluate.yaml", {"data": str(tmp_path / "data"), "output_dir": str(out),
                                  "checkpoint": str(tmp_path / "none.pt")}),
           "VolumeDataError: label", "holds values [5] outside the classes 0..2", "set --num_classes 6")
    assert not out.exists()
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "mask.png")  # a 0/255 mask, not class indices
    with pytest.raises(VolumeDataError, match=r"mask\.png holds values \[255\] outside the classes 0\.\.1"):
        check_labels([{"label": str(tmp_path / "mask.png")}], 2)


def test_empty_folders_fail_with_clear_messages(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(VolumeDataError, match="needs an images/ and a labels/ sub-folder"):
        labeled_data(tmp_path / "empty", tmp_path / "unused", 3)
    (tmp_path / "empty" / "images").mkdir()
    (tmp_path / "empty" / "labels").mkdir()
    with pytest.raises(VolumeDataError, match=r"no image files in .*images; supported: .*\.png"):
        labeled_data(tmp_path / "empty", tmp_path / "unused", 3)
    out = tmp_path / "out"
    _fails(_run("inference.yaml", {"data": str(tmp_path / "empty"), "output_dir": str(out),
                                   "checkpoint": str(tmp_path / "none.pt")}),
           f"VolumeDataError: no image files found under {tmp_path / 'empty'}")
    assert not out.exists()


def test_corrupt_files_fail_with_clear_messages_and_nothing_half_written(calibrated, tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    for name in ("good", "bad"):
        _save(torso_ct(rng, (24, 24, 4)), data / "images" / f"{name}.nii.gz")
        _save(np.zeros((24, 24, 4)), data / "labels" / f"{name}.nii.gz", dtype=np.uint8)
    (data / "images" / "bad.nii.gz").write_bytes(b"not a nifti file")
    with pytest.raises(VolumeDataError, match=r"bad\.nii\.gz: unreadable"):
        labeled_data(data, tmp_path / "unused", 3)
    # a file whose header reads but whose voxels are cut off: named when loaded, before its output is written
    source = tmp_path / "in"
    _save(calibrated["volume"], source / "a.nii.gz")
    whole = _save(rng.normal(0, 100, (40, 40, 30)), tmp_path / "whole.nii.gz", dtype=np.float32).read_bytes()
    (source / "b.nii.gz").write_bytes(whole[: len(whole) // 2])
    out = tmp_path / "out"
    _fails(_run("inference.yaml", {"data": str(source), "output_dir": str(out),
                                   "checkpoint": str(calibrated["root"] / "model.pt")}),
           f"VolumeDataError: {source / 'b.nii.gz'}: unreadable (EOFError")
    assert _files(out) == ["a_seg.nii.gz"]  # the good input's complete result; nothing of the bad one
    Image.new("L", (4, 4)).save(tmp_path / "fine.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(VolumeDataError, match=r"broken\.png: unreadable"):
        inference_datalist([str(tmp_path / "fine.png"), str(tmp_path / "broken.png")], tmp_path, ".png")


# ---------------------------------------------------------------- kill and resume


def test_killed_training_resumes_from_the_latest_checkpoint_which_always_loads(tmp_path):
    """SIGKILL halfway through writing the iteration-4 checkpoint, resume, SIGKILL after iteration 5, resume:
    the run finishes its 6 iterations, and after every kill the latest checkpoint is complete (atomic saves: the
    half-written file is a temporary the resume ignores). 3 training volumes, batch 1, 2 epochs, a checkpoint
    every 2 iterations; the records show where each run started."""
    from lvmmed_monai.engines import latest_checkpoint

    out, helper = tmp_path / "out", str(Path(__file__).with_name("_run_workflow.py"))
    over = {**TINY, "output_dir": str(out), "num_phantoms": 4, "phantom_shape": [32, 32, 6], "patch_size": [32, 32],
            "slices_per_volume": 2, "batch_size": 1, "max_epochs": 2, "ckpt_interval": 2, "sw_batch_size": 6}

    def run(kill_at: int, record: str, **extra) -> tuple[int, list[int], str | None]:
        proc = subprocess.run([sys.executable, helper, str(CONFIGS / "train.yaml"), str(tmp_path / record),
                               str(kill_at), json.dumps({**over, **extra})], capture_output=True, encoding="utf-8",
                              errors="replace", env=ENV, timeout=300, cwd=REPO)
        assert proc.returncode == (-9 if kill_at else 0), proc.stderr[-3000:]
        latest = latest_checkpoint(out / "checkpoints")
        if latest is not None:  # complete: it loads, with the state a resume needs
            state = torch.load(latest, weights_only=True)
            assert set(state) == {"model", "optimizer", "trainer", "rng"}
        records = [json.loads(line)["iteration"] for line in (tmp_path / record).read_text().splitlines()]
        return proc.returncode, records, latest and Path(latest).name

    assert run(-4, "a.jsonl") == (-9, [1, 2, 3], "checkpoint_iteration=2.pt")  # died saving iteration 4
    assert [p.name for p in (out / "checkpoints").iterdir() if p.suffix != ".pt"]  # its half-written temporary
    assert run(5, "b.jsonl", resume=True) == (-9, [3, 4, 5], "checkpoint_iteration=4.pt")
    assert run(0, "c.jsonl", resume=True) == (0, [5, 6], "checkpoint_final_iteration=6.pt")
    assert torch.load(latest_checkpoint(out / "checkpoints"), weights_only=True)["trainer"]["iteration"] == 6
    assert _files(out / "models") == ["model_best.pt", "model_final.pt"]
