"""The lvmmed_cls bundle end to end on tiny settings (CPU): network shapes of every config and of the ViT (the
model zoo's steps on the default network: test_model_zoo.py); a linear probe from
LVM-Med weights on the generated shape phantoms (encoder untouched, head trained, metrics logged, checkpoints);
fine-tuning of the ViT on a list of PNG / RGB JPEG / 2D NIfTI images; evaluation whose probabilities are the
eager network's on hand-preprocessed images and whose accuracy, balanced accuracy and AUC equal scikit-learn's;
inference to an atomically written CSV; the model zoo's ckpt_export (TorchScript, same outputs); and clear errors
for empty folders, a single class, 3D and corrupt files."""

from __future__ import annotations

import csv
import functools
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_helpers import fails as _fails
from bundle_helpers import ok as _ok
from bundle_helpers import run_bundle
from bundle_helpers import scalars as _scalars
from monai.transforms import LoadImage, ScaleIntensityRangePercentiles
from PIL import Image
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

from lvmmed_monai.data.classification import (
    classification_inputs,
    image_classification_data,
    model_class_names,
)
from lvmmed_monai.data.loading import CheckedLoadImaged, VolumeDataError
from lvmmed_monai.data.segmentation import input_stats
from lvmmed_monai.demo import SHAPE_CLASSES, write_shape_phantoms
from lvmmed_monai.engines import BalancedAccuracyMetric
from lvmmed_monai.networks import classification_net_2d

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "bundles" / "lvmmed_cls" / "configs"
_run = functools.partial(run_bundle, CONFIGS)
TINY = {"num_workers": 0, "progress_bar": False}


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ---------------------------------------------------------------- network shapes


def test_network_shapes_verify_in_train_and_evaluate_configs_and_for_the_vit():
    """metadata's network_data_format holds for the networks of train.yaml and evaluate.yaml too, and for the ViT
    (inference.yaml's default network: test_model_zoo.py)."""
    from monai.bundle import verify_net_in_out

    for config in ("train.yaml", "evaluate.yaml"):  # (1, 1, 32, 32) image -> (1, 4) logits
        verify_net_in_out(net_id="network_def", meta_file=str(CONFIGS / "metadata.json"),
                          config_file=str(CONFIGS / config), device="cpu", n=2)
    verify_net_in_out(net_id="network_def", meta_file=str(CONFIGS / "metadata.json"),
                      config_file=str(CONFIGS / "inference.yaml"), device="cpu", n=2, encoder_name="lvmmed_vit_b",
                      image_size=32)


# ---------------------------------------------------------------- training


@pytest.fixture(scope="module")
def probed(module_tmp, r50_file) -> Path:
    """train.yaml, linear probe from the official-layout ResNet-50 weights, on 16 generated 32 x 32 phantoms
    (12 train, 4 validation: one per class), batch 6, 2 epochs of 2 iterations."""
    out = module_tmp("cls")
    proc = _ok(_run("train.yaml", {**TINY, "output_dir": str(out), "num_phantoms": 16, "image_size": 32,
                                   "batch_size": 6, "max_epochs": 2, "init_weights": r50_file}))
    (out.parent / "cls_train.log").write_text(proc.stdout + proc.stderr)
    return out


def test_linear_probe_trains_the_head_alone_and_logs_the_metrics(probed, r50_state):
    assert _files(probed / "models") == ["model_best.pt", "model_final.pt"]  # atomic saves: nothing else
    assert json.loads((probed / "classes.json").read_text()) == {"classes": list(SHAPE_CLASSES)}
    assert sorted(p.name for p in (probed / "default_data").iterdir()) == sorted([*SHAPE_CLASSES, "phantoms.json"])
    state = torch.load(probed / "models" / "model_final.pt", weights_only=True)
    # the frozen encoder is the LVM-Med one, exactly, BatchNorm statistics included (eval mode throughout)
    start = {f"encoder.{k}": v for k, v in r50_state.items() if not k.startswith(("fc.", "conv1."))}
    assert len(start) > 300 and all(torch.equal(state[k], v) for k, v in start.items())
    assert torch.equal(state["encoder.conv1.weight"], r50_state["conv1.weight"].sum(1, keepdim=True))
    fresh = classification_net_2d("lvmmed_resnet50", 1, 4, None, 32).state_dict()
    assert state["head.0.weight"].shape == (4, 2048) and not torch.equal(state["head.0.weight"],
                                                                          fresh["head.0.weight"])
    assert sorted(_scalars(probed / "logs", "train_loss")) == [1, 2, 3, 4]
    for tag in ("val_accuracy", "val_balanced_accuracy", "val_auc"):
        values = _scalars(probed / "logs", tag)
        assert sorted(values) == [1, 2] and all(0.0 <= v <= 1.0 for v in values.values()), tag


def _image_set(root: Path) -> list[dict]:
    """One image per format and class: grey PNG, RGB JPEG and 2D NIfTI of two shape phantoms each."""
    images, labels = _phantoms(6, 32, seed=3)
    items = []
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        grey = (image * 255).round().astype(np.uint8)
        kind = i % 3
        if kind == 0:
            path = root / f"img{i}.png"
            Image.fromarray(grey).save(path)
        elif kind == 1:
            path = root / f"img{i}.jpg"
            Image.fromarray(np.stack([grey, grey, grey], -1)).save(path, quality=95)
        else:
            path = root / f"img{i}.nii.gz"
            nib.save(nib.Nifti1Image(image.astype(np.float32), np.eye(4)), path)
        items.append({"image": str(path), "label": SHAPE_CLASSES[int(label)]})
    return items


def _phantoms(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from lvmmed_monai.demo.phantoms import shape_phantoms

    images, labels = shape_phantoms(n, size, seed)
    return images[:, 0], labels


def test_training_prints_one_line_per_epoch_with_the_validation_metrics_and_writes_the_report(probed):
    log = (probed.parent / "cls_train.log").read_text()
    assert "Metrics --" not in log and "Iter:" not in log and "%|" not in log, log[-3000:]  # not a terminal
    ours = [line.split(" - INFO - ", 1)[1] for line in log.splitlines()
            if " - lvmmed_monai.engines.progress - " in line]
    assert [line.split(" |")[0] for line in ours[:2]] == ["epoch 1/2", "epoch 2/2"], ours
    assert all(f"{m} " in line for line in ours[:2] for m in ("val_balanced_accuracy", "val_accuracy", "val_auc"))
    report = json.loads((probed / "report.json").read_text())
    balanced, loss = _scalars(probed / "logs", "val_balanced_accuracy"), _scalars(probed / "logs", "train_loss")
    assert {r["epoch"]: r["val_balanced_accuracy"] for r in report["epochs"]} == pytest.approx(balanced)
    assert [r["loss"] for r in report["epochs"]] == pytest.approx([(loss[1] + loss[2]) / 2, (loss[3] + loss[4]) / 2])
    best_epoch = max(balanced, key=lambda e: (balanced[e], -e))  # MONAI keeps the first of equal values
    assert report["best"] == {"metric": "val_balanced_accuracy", "value": pytest.approx(balanced[best_epoch]),
                              "epoch": best_epoch}
    assert ours[2].startswith("done: 2 epochs, 4 iterations") and "models/model_best.pt" in ours[-1]


def test_vit_fine_tuning_on_png_jpeg_and_nifti_images(tmp_path, vit_file):
    (tmp_path / "data").mkdir()
    items = _image_set(tmp_path / "data")
    out = tmp_path / "out"
    _ok(_run("train.yaml", {**TINY, "data": items[:4], "val_data": items[4:], "output_dir": str(out),
                            "encoder_name": "lvmmed_vit_b", "init_weights": vit_file, "linear_probe": False,
                            "image_size": 32, "batch_size": 4, "max_epochs": 1, "class_names": list(SHAPE_CLASSES)}))
    state = torch.load(out / "models" / "model_final.pt", weights_only=True)
    start = classification_net_2d("lvmmed_vit_b", 1, 4, vit_file, 32).state_dict()
    moved = [k for k in start if k.startswith("encoder.blocks.") and not torch.equal(state[k], start[k])]
    assert len(moved) > 100  # fine-tuned: the transformer blocks took an Adam step (lr 1e-4) ...
    assert all(torch.allclose(state[k], start[k], atol=2e-4) for k in moved)  # ... one step
    neck = [k for k in start if k.startswith("encoder.neck.")]
    assert neck and all(torch.equal(state[k], start[k]) for k in neck)  # SAM's neck is off the path: frozen
    assert sorted(_scalars(out / "logs", "val_balanced_accuracy")) == [1]


# ---------------------------------------------------------------- evaluation, inference, export


def _preprocessed(path: str, size: int = 32) -> torch.Tensor:
    """What the configs feed the network, by hand: grey, percentile window -> [0, 1], area resize, normalised."""
    arr = np.asarray(LoadImage(image_only=True)(path), dtype=np.float32)
    if arr.ndim == 3:
        arr = arr[..., :3].mean(-1)
    x = torch.as_tensor(ScaleIntensityRangePercentiles(0.5, 99.5, 0.0, 1.0, clip=True)(torch.as_tensor(arr)))
    x = torch.nn.functional.interpolate(x[None, None].float(), size=(size, size), mode="area")
    mean, std = (v[0] for v in input_stats("lvmmed_resnet50", 1))
    return (x - mean) / std


@pytest.fixture(scope="module")
def model(module_tmp) -> dict:
    """A random classifier whose head reads standardised features (so its predictions vary over images: a
    random encoder's pooled features share a large common part), saved as a checkpoint."""
    root = module_tmp("model")
    torch.manual_seed(1)
    net = classification_net_2d("lvmmed_resnet50", 1, 4, None, 32).eval()
    images, _ = _phantoms(32, 32, seed=9)
    mean, std = (v[0] for v in input_stats("lvmmed_resnet50", 1))
    with torch.no_grad():
        features = net.embed((torch.from_numpy(images)[:, None] - mean) / std)
        mu, sd = features.mean(0), features.std(0).clamp_min(1e-6)
        weight = 0.05 * torch.randn(4, features.shape[1]) / sd
        net.head[0].weight.copy_(weight)
        net.head[0].bias.copy_(-weight @ mu)
    torch.save(net.state_dict(), root / "model.pt")
    return {"net": net, "checkpoint": str(root / "model.pt")}


def test_evaluation_metrics_equal_sklearn_and_probabilities_the_eager_network(model, tmp_path):
    data = write_shape_phantoms(tmp_path / "data", num_images=24, size=32, seed=5)
    for path in sorted((data / "cross").iterdir())[2:]:  # imbalanced: 2 crosses, 6 of each other class
        path.unlink()
    out = tmp_path / "eval"
    _ok(_run("evaluate.yaml", {**TINY, "data": str(data), "output_dir": str(out), "checkpoint": model["checkpoint"],
                               "class_names": list(SHAPE_CLASSES), "image_size": 32, "batch_size": 5}))
    assert _files(out) == ["metrics.json", "predictions.csv"]
    rows = _rows(out / "predictions.csv")
    assert len(rows) == 20 and list(rows[0]) == ["image", "label", "prediction",
                                                 *[f"prob_{c}" for c in SHAPE_CLASSES]]
    probs = np.array([[float(r[f"prob_{c}"]) for c in SHAPE_CLASSES] for r in rows])
    labels = np.array([SHAPE_CLASSES.index(r["label"]) for r in rows])
    with torch.no_grad():
        eager = torch.cat([model["net"](_preprocessed(r["image"])).softmax(1) for r in rows]).numpy()
    np.testing.assert_allclose(probs, eager, atol=1e-4)  # batched vs single images: float rounding
    assert [SHAPE_CLASSES.index(r["prediction"]) for r in rows] == list(eager.argmax(1))
    for r in rows:
        assert Path(r["image"]).parent.name == r["label"]
    predicted = probs.argmax(1)
    assert len(set(predicted)) > 1 and accuracy_score(labels, predicted) != balanced_accuracy_score(labels, predicted)
    report = json.loads((out / "metrics.json").read_text())
    assert report["num_images"] == 20 and report["classes"] == list(SHAPE_CLASSES)
    metrics = report["metrics"]
    assert metrics["accuracy"] == pytest.approx(accuracy_score(labels, predicted), abs=1e-6)
    assert metrics["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, predicted), abs=1e-6)
    assert metrics["auc"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr", average="macro"),
                                           abs=1e-6)


def test_inference_writes_one_csv_row_per_image(model, tmp_path):
    source = tmp_path / "in"
    (source / "nested").mkdir(parents=True)
    items = _image_set(source / "nested")  # PNGs, RGB JPEGs, 2D NIfTIs
    (source / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    _ok(_run("inference.yaml", {**TINY, "data": str(source), "output_dir": str(out), "image_size": 32,
                                "checkpoint": model["checkpoint"], "class_names": list(SHAPE_CLASSES)}))
    assert _files(out) == ["predictions.csv"]  # no temporary file left behind
    rows = _rows(out / "predictions.csv")
    assert sorted(r["image"] for r in rows) == sorted(i["image"] for i in items)
    assert list(rows[0]) == ["image", "prediction", *[f"prob_{c}" for c in SHAPE_CLASSES]]
    with torch.no_grad():
        for r in rows:
            eager = model["net"](_preprocessed(r["image"])).softmax(1)[0].numpy()
            np.testing.assert_allclose([float(r[f"prob_{c}"]) for c in SHAPE_CLASSES], eager, atol=1e-4)
            assert r["prediction"] == SHAPE_CLASSES[int(eager.argmax())]


def test_ckpt_export_writes_torchscript_with_the_eager_networks_outputs(probed, tmp_path):
    from monai.bundle import ckpt_export  # what `python -m monai.bundle ckpt_export` runs

    exported = tmp_path / "model.ts"
    checkpoint = probed / "models" / "model_best.pt"
    ckpt_export("network_def", filepath=str(exported), ckpt_file=str(checkpoint),
                meta_file=str(CONFIGS / "metadata.json"), config_file=str(CONFIGS / "inference.yaml"))
    extra = {"metadata.json": "", "inference.json": ""}
    scripted = torch.jit.load(str(exported), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["network_data_format"]["outputs"]["pred"]["num_channels"] == 4
    net = classification_net_2d("lvmmed_resnet50", 1, 4, None, 32)
    net.load_state_dict(torch.load(checkpoint, weights_only=True))
    net.eval()
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        assert scripted(x).shape == (3, 4) and torch.allclose(scripted(x), net(x), atol=1e-5)


def test_the_vit_classifier_scripts_too():
    """ckpt_export of a ViT model scripts the same way (not run end to end here: its file is ~350 MB)."""
    net = classification_net_2d("lvmmed_vit_b", 1, 3, None, 32, linear_probe=True).eval()
    scripted = torch.jit.script(net)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(scripted(x), net(x), atol=1e-5)


# ---------------------------------------------------------------- metrics


def test_balanced_accuracy_equals_sklearn_with_imbalance_and_a_missing_class():
    rng = np.random.default_rng(0)
    labels = rng.choice([0, 1, 3], size=37, p=[0.6, 0.3, 0.1])  # class 2 never labeled, but predicted
    predicted = np.where(rng.random(37) < 0.6, labels, rng.integers(0, 4, 37))
    assert 2 in predicted
    metric = BalancedAccuracyMetric()
    eye = torch.eye(4)
    for chunk in np.array_split(np.arange(37), 4):  # accumulated over batches, as in an epoch
        metric(eye[predicted[chunk]], eye[labels[chunk]])
    with pytest.warns(UserWarning, match="y_pred contains classes not in y_true"):
        expected = balanced_accuracy_score(labels, predicted)
    assert float(metric.aggregate()) == pytest.approx(expected, abs=1e-6)
    metric.reset()
    metric(eye[[0, 1, 1]], eye[[0, 1, 0]])  # recalls 1/2 and 1
    assert float(metric.aggregate()) == pytest.approx(0.75)


# ---------------------------------------------------------------- bad inputs


def test_empty_folder_and_a_single_class_fail_with_clear_messages(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(VolumeDataError, match=r"needs one sub-folder of images per class \(at least 2\).*found "
                                              r"sub-folders with images: \[\]"):
        image_classification_data(tmp_path / "empty", tmp_path / "unused")
    one = tmp_path / "one" / "normal"
    one.mkdir(parents=True)
    for i in range(3):
        Image.new("L", (8, 8), 10 * i).save(one / f"{i}.png")
    with pytest.raises(VolumeDataError, match=r"found sub-folders with images: \['normal'\]"):
        image_classification_data(tmp_path / "one", tmp_path / "unused")
    with pytest.raises(VolumeDataError, match="the training data holds only class 'normal'"):
        image_classification_data(tmp_path / "one", tmp_path / "unused", class_names=["normal", "tumour"])
    entries = [{"image": str(p), "label": "normal"} for p in sorted(one.iterdir())]
    with pytest.raises(VolumeDataError, match=r"the list names a single class \['normal'\]"):
        image_classification_data(entries, tmp_path / "unused")
    with pytest.raises(VolumeDataError, match=r"num_classes=4 but the data has 2 classes.*--num_classes 2"):
        image_classification_data(entries + [{"image": entries[0]["image"], "label": "tumour"}], tmp_path / "unused",
                                  num_classes=4)
    with pytest.raises(VolumeDataError, match=r"7 class names .* for num_classes=4"):
        model_class_names([str(i) for i in range(7)], None, 4)
    with pytest.raises(VolumeDataError, match="no image files found under"):
        classification_inputs(tmp_path / "empty")


def test_corrupt_and_3d_files_fail_before_anything_is_written(tmp_path):
    data = write_shape_phantoms(tmp_path / "data", num_images=8, size=16)
    (data / "ellipse" / "broken.png").write_bytes(b"\x89PNG garbage")
    out = tmp_path / "out"
    _fails(_run("train.yaml", {**TINY, "data": str(data), "output_dir": str(out)}),
           f"VolumeDataError: {data / 'ellipse' / 'broken.png'}: unreadable")
    assert not out.exists()
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 3), np.float32), np.eye(4)), tmp_path / "volume.nii.gz")
    with pytest.raises(VolumeDataError, match=r"volume\.nii\.gz: array of shape \[8, 8, 3\]; expected a 2D image"):
        classification_inputs([str(tmp_path / "volume.nii.gz")])
    # a PNG whose header reads but whose pixels are cut off: named when it is loaded
    whole = tmp_path / "whole.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(whole)
    (tmp_path / "cut.png").write_bytes(whole.read_bytes()[:300])
    assert classification_inputs(str(tmp_path / "cut.png")) == [{"image": str(tmp_path / "cut.png")}]
    with pytest.raises(VolumeDataError, match=r"cut\.png: unreadable"):
        CheckedLoadImaged("image", image_only=True)({"image": str(tmp_path / "cut.png")})
