"""The lvmmed_sam bundle end to end on tiny settings (CPU, ViT-B at 32 px): training from the released ViT-B
layout on generated volumes (the frozen image encoder keeps exactly the released tensors, the decoder trains;
per-class Dice and IoU from ground-truth boxes), evaluation metrics equal to MONAI's ``compute_dice`` of the
box-prompted prediction, inference with boxes from a JSON (2D and 3D, the input's shape and affine) and from label
files, and bad boxes refused before anything is written."""

from __future__ import annotations

import csv
import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from bundle_helpers import causes as _causes
from bundle_helpers import fails as _fails
from bundle_helpers import ok as _ok
from bundle_helpers import run_bundle
from bundle_helpers import save_nifti as _save
from bundle_helpers import scalars as _scalars
from monai.bundle import ConfigParser
from monai.metrics import compute_dice
from PIL import Image

from lvmmed_monai.data.boxes import label_boxes
from lvmmed_monai.demo.volumes import write_phantom_volumes
from lvmmed_monai.weights import resize_vit_state, sam_to_timm

pytest.importorskip("segment_anything")
REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "bundles" / "lvmmed_sam" / "configs"
_run = functools.partial(run_bundle, CONFIGS)
TINY = {"num_workers": 0, "progress_bar": False, "img_size": 32}
AFFINE = np.array([[0, -0.7, 0, 10.0], [0.9, 0, 0, -5.0], [0, 0, 3.0, 2.0], [0, 0, 0, 1]])


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.fixture(scope="module")
def trained(module_tmp, vit_file) -> Path:
    """train.yaml from the released ViT-B layout: 4 generated 32 x 32 x 6 volumes (3 train, 1 val), 2 slices
    each, batch 3 volumes, 2 epochs of 1 iteration, lr 1e-3 so that the decoder visibly moves."""
    out = module_tmp("sam")
    _ok(_run("train.yaml", {**TINY, "output_dir": str(out), "num_phantoms": 4, "phantom_shape": [32, 32, 6],
                            "slices_per_volume": 2, "batch_size": 3, "max_epochs": 2, "lr": 1e-3,
                            "init_weights": vit_file, "class_names": ["background", "lung", "bone"]}))
    return out


def _network(checkpoint: Path):
    from lvmmed_monai.networks import LVMMedSAM

    net = LVMMedSAM(img_size=32, in_channels=1)
    net.load_state_dict(torch.load(checkpoint, weights_only=True))
    return net.eval()


def test_training_keeps_the_frozen_encoder_trains_the_decoder_and_logs_dice(trained, sam_vit_state):
    models = trained / "models"
    assert _files(models) == ["model_best.pt", "model_final.pt"]
    state = torch.load(models / "model_final.pt", weights_only=True)
    encoder = {k[len("image_encoder."):]: v for k, v in state.items() if k.startswith("image_encoder.")}
    released, _ = resize_vit_state(sam_to_timm(sam_vit_state), encoder)
    released["patch_embed.proj.weight"] = released["patch_embed.proj.weight"].sum(1, keepdim=True)  # 1 channel
    assert set(encoder) == set(released)
    assert all(torch.equal(encoder[k], released[k]) for k in encoder)  # frozen: exactly the released tensors
    torch.manual_seed(0)
    from lvmmed_monai.networks import LVMMedSAM

    fresh = LVMMedSAM(img_size=32, in_channels=1).mask_decoder.state_dict()
    moved = [k for k, v in fresh.items() if not torch.equal(state[f"mask_decoder.{k}"], v)]
    assert len(moved) > len(fresh) // 2  # the decoder trained (2 AdamW steps from the seed-0 init)
    assert sorted(_scalars(trained / "logs", "train_loss")) == [1, 2]
    for tag in ("val_mean_dice", "val_mean_iou", "val_dice_lung", "val_dice_bone"):
        values = _scalars(trained / "logs", tag)
        assert sorted(values) == [1, 2] and all(0.0 <= v <= 1.0 for v in values.values()), tag
    report = json.loads((trained / "report.json").read_text())
    assert [e["epoch"] for e in report["epochs"]] == [1, 2]


def _prepared(image: np.ndarray) -> torch.Tensor:
    """The bundle's preprocessing of one grey volume or image (percentile window, SAM statistics), channel first."""
    from monai.transforms import NormalizeIntensity, ScaleIntensityRangePercentiles

    from lvmmed_monai.data.segmentation import input_stats

    mean, std = input_stats("lvmmed_vit_b", 1)
    x = ScaleIntensityRangePercentiles(0.5, 99.5, 0.0, 1.0, clip=True)(torch.as_tensor(image, dtype=torch.float32))
    return NormalizeIntensity(mean, std, channel_wise=True)(x[None])


def _predict(net, image: np.ndarray, table: np.ndarray, num_classes: int = 3) -> np.ndarray:
    from lvmmed_monai.inference import BoxPromptInferer

    with torch.no_grad():
        scores = BoxPromptInferer(num_classes, sw_batch_size=4)(_prepared(image)[None], net, torch.as_tensor(table))
    return scores[0].argmax(0).numpy()


def test_evaluation_metrics_equal_monai_compute_dice_of_the_box_prompted_prediction(trained, tmp_path):
    data = write_phantom_volumes(tmp_path / "data", "segmentation", 2, (32, 32, 6), seed=5)
    out = tmp_path / "eval"
    _ok(_run("evaluate.yaml", {**TINY, "data": str(data), "output_dir": str(out),
                               "checkpoint": str(trained / "models" / "model_final.pt"),
                               "class_names": ["background", "lung", "bone"]}))
    assert _files(out) == ["metrics.csv", "metrics.json"]
    rows = {Path(r["case"]).name: r for r in csv.DictReader(open(out / "metrics.csv"))}
    net = _network(trained / "models" / "model_final.pt")
    from monai.transforms import LoadImage

    for image_path in sorted((data / "images").iterdir()):
        image = np.asarray(LoadImage(image_only=True)(str(image_path)))
        label = np.asarray(LoadImage(image_only=True)(str(data / "labels" / image_path.name))).astype(np.int64)
        pred = _predict(net, image, label_boxes(label, "class", 2))

        def onehot(labels: np.ndarray) -> torch.Tensor:
            return torch.nn.functional.one_hot(torch.as_tensor(labels, dtype=torch.long), 3).movedim(-1, 0)[None]

        dice = compute_dice(onehot(pred), onehot(label), include_background=False)[0]
        for c, cls in enumerate(("lung", "bone")):
            assert float(rows[image_path.name][f"dice_{cls}"]) == pytest.approx(float(dice[c]), abs=1e-5)


def test_inference_with_json_boxes_writes_the_prediction_with_the_input_shape_and_affine(trained, tmp_path):
    """A NIfTI volume (boxes on two slices) and a PNG (one box): each output is the inferer's argmax for those
    boxes, with the input's shape and affine; the volume's slices without boxes are background."""
    rng = np.random.default_rng(0)
    volume = rng.normal(0, 100, (30, 26, 5))
    _save(volume, tmp_path / "in" / "vol.nii.gz", AFFINE)
    photo = (rng.random((40, 36)) * 255).astype(np.uint8)
    Image.fromarray(photo).save(tmp_path / "in" / "photo.png")
    boxes = {"vol.nii.gz": [{"box": [2, 3, 20, 25], "label": 1, "slice": 1},
                            {"box": [0, 0, 25, 29], "label": 2, "slice": 3},
                            {"box": [5, 5, 10, 12], "label": 1, "slice": 3}],
             "photo.png": [{"box": [4, 6, 30, 35], "label": 2}]}
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    out = tmp_path / "pred"
    _ok(_run("inference.yaml", {**TINY, "data": str(tmp_path / "in"), "boxes_file": str(tmp_path / "boxes.json"),
                                "output_dir": str(out), "checkpoint": str(trained / "models" / "model_final.pt")}))
    assert _files(out) == ["photo_seg.nii.gz", "vol_seg.nii.gz"]
    import nibabel as nib

    written = nib.load(out / "vol_seg.nii.gz")
    assert written.shape == volume.shape and np.allclose(written.affine, AFFINE)
    net = _network(trained / "models" / "model_final.pt")
    table = np.array([[e["slice"], e["label"], *e["box"]] for e in boxes["vol.nii.gz"]], np.float32)
    expected = _predict(net, volume, table)
    assert np.array_equal(np.asarray(written.dataobj), expected)
    assert not expected[..., [0, 2, 4]].any()
    from monai.transforms import LoadImage

    png = np.asarray(LoadImage(image_only=True)(str(tmp_path / "in" / "photo.png")))
    written_png = nib.load(out / "photo_seg.nii.gz")
    assert written_png.shape == png.shape
    assert np.array_equal(np.asarray(written_png.dataobj), _predict(net, png, np.array([[0, 2, 4, 6, 30, 35]])))


def test_inference_boxes_from_label_files_and_on_the_default_phantoms(trained, tmp_path):
    data = write_phantom_volumes(tmp_path / "data", "segmentation", 1, (32, 32, 6), seed=3)
    out = tmp_path / "pred"
    _ok(_run("inference.yaml", {**TINY, "data": str(data / "images"), "box_labels": str(data / "labels"),
                                "box_mode": "component", "output_dir": str(out),
                                "checkpoint": str(trained / "models" / "model_final.pt")}))
    [name] = _files(data / "images")
    assert _files(out) == [name.replace(".nii.gz", "_seg.nii.gz")]
    # no data, no boxes: the phantoms of train.yaml, boxed from their own labels
    _ok(_run("inference.yaml", {**TINY, "train_dir": str(trained), "num_phantoms": 4, "phantom_shape": [32, 32, 6],
                                "checkpoint": str(trained / "models" / "model_final.pt")}))
    assert len(_files(trained / "predictions")) == 4


def test_bad_boxes_fail_before_anything_is_written(trained, tmp_path):
    _save(np.random.default_rng(0).normal(size=(20, 24, 4)), tmp_path / "in" / "vol.nii.gz")
    out = tmp_path / "pred"
    ckpt = str(trained / "models" / "model_final.pt")
    (tmp_path / "boxes.json").write_text(json.dumps({"vol.nii.gz": [{"box": [0, 0, 30, 10], "label": 1, "slice": 0}]}))
    _fails(_run("inference.yaml", {**TINY, "data": str(tmp_path / "in"), "boxes_file": str(tmp_path / "boxes.json"),
                                   "output_dir": str(out), "checkpoint": ckpt}),
           "vol.nii.gz: box 0: [0, 0, 30, 10] not inside the 20 x 24 slice")
    assert _files(out) == []
    # the same workflow's data list, parsed in-process (a bundle run each would cost ~15 s more)
    (tmp_path / "other.json").write_text(json.dumps({"other.nii.gz": [{"box": [0, 0, 3, 3], "label": 1}]}))
    for overrides, message in (({"boxes_file": str(tmp_path / "other.json")},
                                "boxes for images not in the data: ['other.nii.gz']"),
                               ({}, "box-prompted segmentation needs boxes: pass --boxes_file")):
        parser = ConfigParser()
        parser.read_config(str(CONFIGS / "inference.yaml"))
        parser.update({**TINY, "data": str(tmp_path / "in"), "output_dir": str(out), "checkpoint": ckpt, **overrides})
        with pytest.raises(RuntimeError) as err:
            parser.get_parsed_content("datalist")
        assert message in str(_causes(err.value)[-1]), _causes(err.value)
    assert _files(out) == []


def test_configs_parse_with_the_documented_keys():
    for name in ("train.yaml", "evaluate.yaml", "inference.yaml"):
        parser = ConfigParser()
        parser.read_config(str(CONFIGS / name))
        assert parser["network_def"]["_target_"] == "lvmmed_monai.networks.LVMMedSAM"
        assert parser["img_size"] == 128 and parser["num_classes"] == 3
