"""The lvmmed_det bundle end to end on tiny settings (CPU): the network's outputs are the ones metadata names (the
model zoo's steps: test_model_zoo.py); AP at IoU 0.5 equal to values computed by hand from the precision-recall
curve (COCO's 101-point interpolation); COCO-style JSON reading and the generated phantoms; image and boxes kept
together through flips and the (C, W, H) -> (C, H, W) transposition; training from LVM-Med weights (checkpoints,
TensorBoard, frozen stages untouched); evaluation whose mAP is 1 on a set annotated with the network's own
confident detections and whose detections are the eager network's on hand-preprocessed images; inference to one
atomically written COCO-style JSON with the right image ids; and clear errors, with nothing written, for bad
inputs."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from bundle_helpers import ok as _ok
from bundle_helpers import run_bundle
from bundle_helpers import scalars as _scalars
from PIL import Image

from lvmmed_monai.data.detection import (
    detection_data,
    detection_datalist,
    detection_inputs,
    model_categories,
    read_coco,
)
from lvmmed_monai.data.loading import CheckedLoadImaged, VolumeDataError
from lvmmed_monai.demo import DETECTION_CLASSES, detection_phantoms, write_detection_phantoms
from lvmmed_monai.engines import DetectionAP, DetectionPrepareBatch, average_precision, per_class_ap
from lvmmed_monai.networks import lvmmed_faster_rcnn

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "bundles" / "lvmmed_det" / "configs"
_run = functools.partial(run_bundle, CONFIGS)
TINY = {"num_workers": 0, "progress_bar": False}
# fewer proposals and sampled RoIs than torchvision's defaults: the box head dominates the CPU time
FAST = {"rpn_pre_nms_top_n_train": 400, "rpn_post_nms_top_n_train": 200, "box_batch_size_per_image": 64,
        "rpn_pre_nms_top_n_test": 200, "rpn_post_nms_top_n_test": 100}
EVAL = {**FAST, "box_score_thresh": 0.0, "box_detections_per_img": 30}  # every class of every proposal scored


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _coco(images: list[tuple], annotations: list[tuple], categories: dict[int, str]) -> dict:
    """A COCO dict from ``(id, file_name, width, height)`` and ``(image_id, category_id, [x, y, w, h])``."""
    return {"images": [{"id": i, "file_name": f, "width": w, "height": h} for i, f, w, h in images],
            "annotations": [{"id": k + 1, "image_id": i, "category_id": c, "bbox": b}
                            for k, (i, c, b) in enumerate(annotations)],
            "categories": [{"id": c, "name": n} for c, n in categories.items()]}


def _write(path: Path, coco: dict) -> Path:
    path.write_text(json.dumps(coco))
    return path


# ---------------------------------------------------------------- metadata


def test_metadata_names_the_networks_outputs():
    meta = json.loads((CONFIGS / "metadata.json").read_text())["network_data_format"]
    net = lvmmed_faster_rcnn(3, None, 1, min_size=32, max_size=32, **EVAL).eval()
    with torch.no_grad():
        out = net([torch.rand(1, 32, 40)])[0]
    # verify_net_in_out does not apply (a list of dicts of any length out); the metadata names what comes out
    assert sorted(out) == sorted(meta["outputs"]["pred"]["channel_def"])
    assert meta["inputs"]["image"]["num_channels"] == 1 and out["boxes"].shape[1] == 4


# ---------------------------------------------------------------- AP at IoU 0.5


def _target(boxes: list, labels: list) -> dict:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels)}


def _pred(boxes: list, labels: list, scores: list) -> dict:
    return {**_target(boxes, labels), "scores": torch.tensor(scores)}


A, B, C, D = [0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [60, 0, 64, 8]


def test_ap_equals_hand_computed_values():
    targets = [_target([A, B], [1, 2]), _target([C], [1]), _target([], [])]
    perfect = [_pred([A, B], [1, 2], [0.9, 0.6]), _pred([C], [1], [0.7]), _pred([], [], [])]
    np.testing.assert_allclose(average_precision(perfect, targets, 3), [1.0, 1.0])
    # one false positive ranked above the only true positive: precision 1/2 at recall 1 -> AP 1/2
    ap = average_precision([_pred([D, A], [1, 1], [0.9, 0.8])], [_target([A], [1])], 3)
    np.testing.assert_allclose(ap, [0.5, np.nan])
    # 3 targets of class 2; ranked: TP .95, FP .9 (IoU 0.4 with A: not a match at 0.5), TP .8; one target missed.
    # recall 1/3 2/3 at ranks 1 3, precision 1, 1/2, 2/3 -> envelope 1 up to recall 1/3 (34 of the 101 points
    # 0, .01 .. .33), 2/3 up to 2/3 (33 points .34 .. .66), 0 beyond (34 points): AP = (34 + 33 * 2/3) / 101
    targets = [_target([A, B], [2, 2]), _target([C], [2])]
    preds = [_pred([A, [0, 0, 10, 4]], [2, 2], [0.95, 0.9]), _pred([C], [2], [0.8])]
    np.testing.assert_allclose(average_precision(preds, targets, 3), [np.nan, 56 / 101])
    # IoU at least 0.5 matches: [0, 0, 10, 6] has IoU 0.6 with A
    np.testing.assert_allclose(average_precision([_pred([[0, 0, 10, 6]], [1], [0.5])], [_target([A], [1])], 3),
                               [1.0, np.nan])
    # a wrong label is a false positive of its class and a miss of the target's
    np.testing.assert_allclose(average_precision([_pred([A], [2], [0.9])], [_target([A], [1])], 3), [0.0, np.nan])


def test_ap_metric_accumulates_over_batches_and_skips_classes_without_targets():
    targets = [_target([A, B], [2, 2]), _target([C], [2]), _target([A], [1])]
    preds = [_pred([A, [0, 0, 10, 4]], [2, 2], [0.95, 0.9]), _pred([C, D], [2, 3], [0.8, 0.99]),
             _pred([[0, 0, 10, 6], D], [1, 1], [0.5, 0.7])]  # class 3: predicted, never a target
    mean, per_class = DetectionAP(4), per_class_ap(4, ["a", "b", "c"])
    for metric in (mean, *per_class.values()):
        metric.reset()
        metric.update((preds[:2], targets[:2]))  # two batches, as an evaluator's iterations
        metric.update((preds[2:], targets[2:]))
    # class 1: FP .7 above TP .5 -> 1/2; class 2: 56/101 (above); class 3: no target -> NaN, out of the mean
    assert sorted(per_class) == ["val_ap50_a", "val_ap50_b", "val_ap50_c"]
    assert per_class["val_ap50_a"].compute() == pytest.approx(0.5)
    assert per_class["val_ap50_b"].compute() == pytest.approx(56 / 101)
    assert np.isnan(per_class["val_ap50_c"].compute())
    assert mean.compute() == pytest.approx((0.5 + 56 / 101) / 2)
    with pytest.raises(TypeError, match="no_collation"):
        DetectionPrepareBatch()({"image": torch.zeros(2, 1, 8, 8)})


# ---------------------------------------------------------------- data


def test_phantoms_round_trip_through_the_coco_json(tmp_path):
    root = write_detection_phantoms(tmp_path / "ph", num_images=6, size=48, seed=4)
    items, categories = read_coco(root)
    assert categories == [{"id": 1, "name": "nodule"}, {"id": 2, "name": "cyst"}]
    images, boxes, labels = detection_phantoms(6, 48, seed=4)
    for i, item in enumerate(items):
        assert item["image_id"] == i + 1 and (item["width"], item["height"]) == (48, 48)
        assert item["boxes"].dtype == np.float32 and item["labels"].dtype == np.int64
        xyxy = np.concatenate([boxes[i][:, :2], boxes[i][:, :2] + boxes[i][:, 2:]], 1)
        np.testing.assert_array_equal(item["boxes"], xyxy)
        np.testing.assert_array_equal(item["labels"], labels[i])
        png = np.asarray(Image.open(item["image"]), np.float32) / 255
        np.testing.assert_allclose(png, images[i], atol=0.5 / 255 + 1e-6)  # (H, W): rows are y
        for (x1, y1, x2, y2), label in zip(item["boxes"].astype(int), item["labels"], strict=True):
            inside, ring = png[y1:y2, x1:x2], png[max(y1 - 1, 0):y2 + 1, max(x1 - 1, 0):x2 + 1]
            # nodules are bright, cysts have a bright rim: the box holds the brightest pixels of its neighbourhood
            assert inside.max() == ring.max() and inside.max() > np.median(png) + 0.25, (i, label)
    assert {int(v) for item in items for v in item["labels"]} == {1, 2}
    assert len(DETECTION_CLASSES) == 2


def test_flips_move_image_and_boxes_together_into_torchvisions_layout(tmp_path):
    """A 40 x 24 image with one bright box: after the configs' transforms the image is (1, H, W) and its bright
    pixels are exactly the box, unflipped (validation) and flipped on both axes (training, flip_prob 1)."""
    from monai.bundle import ConfigParser

    pixels = np.full((24, 40), 50, np.uint8)
    pixels[3:10, 5:15] = 200  # rows (y) 3..9, columns (x) 5..14
    Image.fromarray(pixels).save(tmp_path / "a.png")
    coco = _write(tmp_path / "a.json", _coco([(5, "a.png", 40, 24)], [(5, 4, [5, 3, 10, 7])], {4: "box"}))
    (item,), _ = read_coco(coco)
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.yaml"))
    parser.update({"flip_prob": 1.0, "intensity_scale": 0.0, "intensity_shift": 0.0})
    for key, box in (("validate#preprocessing", [5, 3, 15, 10]), ("train#preprocessing", [25, 14, 35, 21])):
        out = parser.get_parsed_content(key)(dict(item))
        assert out["image"].shape == (1, 24, 40)
        assert out["boxes"].tolist() == [box] and out["labels"].tolist() == [1]
        x1, y1, x2, y2 = box
        expected = np.zeros((24, 40), bool)
        expected[y1:y2, x1:x2] = True
        np.testing.assert_array_equal(np.asarray(out["image"][0]) > 0.5, expected)


def test_detection_data_splits_and_checks_num_classes(tmp_path):
    split = detection_data(None, tmp_path / "ph", 3, num_phantoms=8, image_size=32)
    assert len(split["train"]) == 6 and len(split["val"]) == 2
    assert {i["image_id"] for i in split["train"]} | {i["image_id"] for i in split["val"]} == set(range(1, 9))
    with pytest.raises(VolumeDataError, match=r"num_classes=4 but the data has 2 categories .* --num_classes 3"):
        detection_data(tmp_path / "ph", tmp_path / "unused", 4)
    # crowd annotations are left out; images without boxes stay (negatives)
    Image.new("L", (16, 16)).save(tmp_path / "n.png")
    coco = _coco([(1, "n.png", 16, 16), (2, "ph/images/phantom_000.png", 32, 32)], [(2, 1, [1, 1, 4, 4])],
                 {1: "a"})
    coco["annotations"].append({"id": 9, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "iscrowd": 1})
    items, _ = read_coco(_write(tmp_path / "c.json", coco))
    assert [len(i["boxes"]) for i in items] == [0, 1]
    # inference on a COCO JSON keeps its image ids and file names
    assert [(i["image_id"], i["file_name"], i["width"]) for i in detection_inputs(str(tmp_path / "c.json"))] == [
        (1, "n.png", 16), (2, "ph/images/phantom_000.png", 32)]


def test_bad_annotations_fail_with_clear_messages(tmp_path):
    Image.new("L", (32, 24)).save(tmp_path / "a.png")
    images, cats = [(1, "a.png", 32, 24)], {1: "lesion", 2: "cyst"}

    def read(annotations: list, images: list = images, in_json: dict = cats, **kwargs) -> None:
        read_coco(_write(tmp_path / "x.json", _coco(images, annotations, in_json)), **kwargs)

    with pytest.raises(VolumeDataError, match=r"annotation 1 \(a\.png\): bbox \[20, 2, 13, 5\] reaches outside its "
                                              r"32 x 24 image \(x \+ w = 33"):
        read([(1, 1, [20, 2, 13, 5])])
    with pytest.raises(VolumeDataError, match=r"bbox \[3, 2, 0, 5\] has zero area.*Fix or drop these annotations"):
        read([(1, 1, [3, 2, 0, 5])])
    with pytest.raises(VolumeDataError, match=r"has category_id 7, not among the categories \[1, 2\]"):
        read([(1, 7, [3, 2, 4, 5])])
    with pytest.raises(VolumeDataError, match=r"has image_id 3, not an id of 'images'"):
        read([(3, 1, [3, 2, 4, 5])])
    with pytest.raises(VolumeDataError, match=r"\(and 1 more\)"):  # every problem counted, 5 listed
        read([(1, 1, [3, 2, -1, 5])] * 6)
    with pytest.raises(VolumeDataError, match=r"no boxes \(the 'annotations' list has no usable entry\)"):
        read([])
    with pytest.raises(VolumeDataError, match=r"the 'images' list is empty"):
        read([], images=[])
    with pytest.raises(VolumeDataError, match=r"a\.png: 32 x 24 pixels \(width x height\) but .* says 24 x 32"):
        read([(1, 1, [3, 2, 4, 5])], images=[(1, "a.png", 24, 32)])
    with pytest.raises(VolumeDataError, match=r"b\.png: no such file \(image id 1 of .*--image_dir"):
        read([(1, 1, [3, 2, 4, 5])], images=[(1, "b.png", 32, 24)])
    with pytest.raises(VolumeDataError, match=r"categories \[\"2 'tumour'\"\] are not the model's"):
        read([(1, 2, [3, 2, 4, 5])], in_json={2: "tumour"}, categories=[{"id": 2, "name": "cyst"}])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(VolumeDataError, match=r"bad\.json: not valid JSON"):
        read_coco(tmp_path / "bad.json")
    with pytest.raises(VolumeDataError, match=r"needs the lists 'images', 'annotations' and 'categories'; missing "
                                              r"or not a list: \['annotations'\]"):
        read_coco(_write(tmp_path / "z.json", {"images": [], "categories": []}))
    (tmp_path / "empty").mkdir()
    with pytest.raises(VolumeDataError, match=r"annotations\.json: no such file; pass a COCO-style JSON"):
        detection_datalist(tmp_path / "empty", [{"id": 1, "name": "lesion"}])
    with pytest.raises(VolumeDataError, match="no image files found under"):
        detection_inputs(tmp_path / "empty")
    with pytest.raises(VolumeDataError, match=r"3 categories .* for num_classes=3 .* set --num_classes 4"):
        model_categories(["a", "b", "c"], None, 3)


def test_corrupt_images_fail_with_clear_messages(tmp_path):
    (tmp_path / "a.png").write_bytes(b"\x89PNG garbage")
    coco = _write(tmp_path / "a.json", _coco([(1, "a.png", 8, 8)], [(1, 1, [1, 1, 2, 2])], {1: "x"}))
    with pytest.raises(VolumeDataError, match=r"a\.png: unreadable"):
        read_coco(coco)
    with pytest.raises(VolumeDataError, match=r"a\.png: unreadable"):
        detection_inputs(tmp_path)
    # a PNG whose header reads but whose pixels are cut off: named when it is loaded
    whole = tmp_path / "whole.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(whole)
    (tmp_path / "cut.png").write_bytes(whole.read_bytes()[:300])
    assert detection_inputs([str(tmp_path / "cut.png")])[0]["width"] == 64
    with pytest.raises(VolumeDataError, match=r"cut\.png: unreadable"):
        CheckedLoadImaged("image", image_only=True)({"image": str(tmp_path / "cut.png")})


# ---------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained(module_tmp, r50_file) -> Path:
    """train.yaml from the official-layout ResNet-50 weights on 8 generated 64 x 64 phantoms (6 train, 2
    validation), batch 2, 2 epochs of 2 iterations."""
    out = module_tmp("det")
    _ok(_run("train.yaml", {**TINY, "output_dir": str(out), "num_phantoms": 8, "batch_size": 2, "max_epochs": 2,
                            "epoch_length": 2, "warmup_iters": 2, "init_weights": r50_file, "net_kwargs": FAST}))
    return out


def test_training_writes_checkpoints_logs_and_keeps_the_frozen_stages(trained, r50_state):
    assert _files(trained / "models") == ["model_best.pt", "model_final.pt"]  # atomic saves: nothing else
    assert json.loads((trained / "categories.json").read_text()) == {
        "categories": [{"id": 1, "name": "nodule"}, {"id": 2, "name": "cyst"}]}
    assert _files(trained / "default_data") == ["annotations.json", "images", "phantoms.json"]
    state = torch.load(trained / "models" / "model_final.pt", weights_only=True)
    # trainable_layers 3 from weights: conv1 and layer1 are frozen, the LVM-Med ones exactly; layer4 trained
    frozen = {f"backbone.body.{k}": v for k, v in r50_state.items()
              if k.startswith("layer1.") and not k.endswith("num_batches_tracked")}  # FrozenBatchNorm2d: no counter
    assert len(frozen) > 20 and all(torch.equal(state[k], v) for k, v in frozen.items())
    assert torch.equal(state["backbone.body.conv1.weight"], r50_state["conv1.weight"].sum(1, keepdim=True))
    assert not torch.equal(state["backbone.body.layer4.0.conv1.weight"], r50_state["layer4.0.conv1.weight"])
    for tag in ("train_loss", "loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"):
        values = _scalars(trained / "logs", tag)
        assert sorted(values) == [1, 2, 3, 4] and all(np.isfinite(v) and v >= 0 for v in values.values()), tag
    for tag in ("val_map50", "val_ap50_nodule", "val_ap50_cyst"):
        values = _scalars(trained / "logs", tag)
        assert sorted(values) == [1, 2] and all(0.0 <= v <= 1.0 for v in values.values()), tag


# ---------------------------------------------------------------- export, evaluation, inference


def _hand_preprocessed(path: Path) -> torch.Tensor:
    """What the configs feed the network, by hand from PIL's (H, W[, 3]) pixels: grey, percentile window ->
    [0, 1], (1, H, W)."""
    arr = np.asarray(Image.open(path), np.float64)
    arr = arr[..., :3].mean(-1) if arr.ndim == 3 else arr
    lo, hi = np.percentile(arr, [0.5, 99.5])
    return torch.from_numpy(np.clip((arr - lo) / (hi - lo), 0, 1)).float()[None]


@pytest.fixture(scope="module")
def model(module_tmp) -> dict:
    """A randomly initialised detector (``EVAL`` settings: every proposal scored), saved as a checkpoint, with a
    training folder whose categories.json has the non-contiguous ids 3 and 7."""
    root = module_tmp("model")
    torch.manual_seed(1)
    net = lvmmed_faster_rcnn(3, None, 1, min_size=64, max_size=1333, **EVAL).eval()
    torch.save(net.state_dict(), root / "model.pt")
    (root / "categories.json").write_text(json.dumps({"categories": [{"id": 3, "name": "nodule"},
                                                                     {"id": 7, "name": "cyst"}]}))
    return {"net": net, "checkpoint": str(root / "model.pt"), "train_dir": str(root), "ids": [3, 7]}


def _eager(net: torch.nn.Module, paths: list[Path]) -> list[dict]:
    """One image per call: torchvision zero-pads the images of a batch to one size, which changes the features
    near the borders of the smaller ones."""
    with torch.no_grad():
        return [net([_hand_preprocessed(p)])[0] for p in paths]


def test_evaluation_map_is_one_on_the_networks_own_confident_detections(model, tmp_path):
    root = write_detection_phantoms(tmp_path / "set", num_images=3, size=64, seed=3)
    paths = sorted((root / "images").iterdir())
    preds = _eager(model["net"], paths)
    scores = np.sort(np.concatenate([p["scores"].numpy() for p in preds]))
    gaps = np.diff(scores[len(scores) // 4: 3 * len(scores) // 4])
    cut = scores[len(scores) // 4 + int(gaps.argmax())] + gaps.max() / 2  # a threshold far from every score
    images = [(10 + i, f"images/{p.name}", 64, 64) for i, p in enumerate(paths)]
    annotations = [(10 + i, model["ids"][int(label) - 1], [x1, y1, x2 - x1, y2 - y1])
                   for i, p in enumerate(preds) for (x1, y1, x2, y2), label, score in
                   zip(p["boxes"].tolist(), p["labels"].tolist(), p["scores"].tolist(), strict=True) if score > cut]
    assert {a[1] for a in annotations} == {3, 7}
    gt = _write(root / "gt.json", _coco(images, annotations, {3: "nodule", 7: "cyst"}))
    out = tmp_path / "eval"
    _ok(_run("evaluate.yaml", {"data": str(gt), "train_dir": model["train_dir"], "checkpoint": model["checkpoint"],
                               "output_dir": str(out), "net_kwargs": EVAL, "batch_size": 2}))
    assert _files(out) == ["metrics.json", "predictions.json"]
    report = json.loads((out / "metrics.json").read_text())
    # every target is a detection ranked above every other detection of the set: precision 1 at every recall
    assert report["metrics"] == {"map50": pytest.approx(1.0), "ap50_nodule": pytest.approx(1.0),
                                 "ap50_cyst": pytest.approx(1.0)}
    assert report["num_images"] == 3 and report["iou_threshold"] == 0.5
    assert report["categories"] == [{"id": 3, "name": "nodule"}, {"id": 7, "name": "cyst"}]
    written = json.loads((out / "predictions.json").read_text())
    assert [i["id"] for i in written["images"]] == [10, 11, 12]
    confident = [(a["image_id"], a["category_id"], a["bbox"]) for a in written["annotations"] if a["score"] > cut]
    assert len(confident) == len(annotations)
    for (i, c, box), (ei, ec, ebox) in zip(confident, annotations, strict=True):
        assert (i, c) == (ei, ec) and np.allclose(box, ebox, atol=1e-3)


def test_inference_writes_one_coco_json_with_the_right_image_ids(model, tmp_path):
    source = tmp_path / "in"
    (source / "b").mkdir(parents=True)
    images, _, _ = detection_phantoms(3, 64, seed=7)
    grey = (images * 255).round().astype(np.uint8)
    Image.fromarray(grey[0]).save(source / "b" / "one.png")
    Image.fromarray(np.stack([grey[1][:56, :]] * 3, -1)).save(source / "a_rgb.png")  # 64 wide, 56 high, RGB
    Image.fromarray(grey[2][:, :48]).save(source / "c.png")  # 48 wide, 64 high
    (source / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    _ok(_run("inference.yaml", {"data": str(source), "train_dir": model["train_dir"],
                                "checkpoint": model["checkpoint"], "output_dir": str(out), "net_kwargs": EVAL,
                                "score_threshold": 0.0, "batch_size": 1}))
    assert _files(out) == ["predictions.json"]  # no temporary file left behind
    written = json.loads((out / "predictions.json").read_text())
    assert written["images"] == [{"id": 1, "file_name": "a_rgb.png", "width": 64, "height": 56},
                                 {"id": 2, "file_name": "b/one.png", "width": 64, "height": 64},
                                 {"id": 3, "file_name": "c.png", "width": 48, "height": 64}]
    assert written["categories"] == [{"id": 3, "name": "nodule"}, {"id": 7, "name": "cyst"}]
    preds = _eager(model["net"], [source / i["file_name"] for i in written["images"]])
    for image, pred in zip(written["images"], preds, strict=True):
        found = [a for a in written["annotations"] if a["image_id"] == image["id"]]
        assert len(found) == len(pred["boxes"]) == 30
        boxes = torch.tensor([a["bbox"] for a in found])
        boxes[:, 2:] += boxes[:, :2]
        torch.testing.assert_close(boxes, pred["boxes"], atol=2e-3, rtol=0)
        assert [a["category_id"] for a in found] == [model["ids"][int(c) - 1] for c in pred["labels"]]
        np.testing.assert_allclose([a["score"] for a in found], pred["scores"].numpy(), atol=1e-5)
        assert all(0 <= a["bbox"][0] and a["bbox"][0] + a["bbox"][2] <= image["width"] + 1e-3 for a in found)


# ---------------------------------------------------------------- bad inputs, nothing written


def _workflow(config: str, overrides: dict) -> object:
    """The config as ``python -m monai.bundle run`` runs it (MONAI's ConfigWorkflow), in this process."""
    from monai.bundle import ConfigWorkflow

    return ConfigWorkflow(config_file=str(CONFIGS / config), workflow_type=None, **overrides)


def _cause(error: BaseException, kind: type) -> BaseException:
    """The ``kind`` error under MONAI's wrappers (a config expression or transform that raised)."""
    while error is not None and not isinstance(error, kind):
        error = error.__cause__ or error.__context__
    assert error is not None, f"no {kind.__name__} in the chain"
    return error


def test_bad_boxes_fail_before_anything_is_written(tmp_path):
    root = write_detection_phantoms(tmp_path / "data", num_images=4, size=32)
    coco = json.loads((root / "annotations.json").read_text())
    coco["annotations"][2]["bbox"][0] = 30.0  # reaches outside its 32 x 32 image
    out = tmp_path / "out"
    workflow = _workflow("train.yaml", {**TINY, "data": str(_write(root / "bad.json", coco)), "output_dir": str(out)})
    with pytest.raises(RuntimeError) as raised:
        workflow.initialize()
    assert f"{root / 'bad.json'}: annotation 3 (images/phantom_001.png): bbox [30.0, 4.0, 9.0, 9.0] reaches outside " \
           "its 32 x 32 image" in str(_cause(raised.value, VolumeDataError))
    assert not out.exists()


def test_a_cut_off_image_fails_inference_without_a_partial_json(model, tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    Image.fromarray(pixels).save(source / "a.png")
    (source / "b.png").write_bytes((source / "a.png").read_bytes()[:300])  # the header reads, the pixels do not
    out = tmp_path / "out"
    workflow = _workflow("inference.yaml", {"data": str(source), "train_dir": model["train_dir"], "batch_size": 1,
                                            "checkpoint": model["checkpoint"], "output_dir": str(out),
                                            "net_kwargs": EVAL})
    workflow.initialize()  # the headers read: the run starts
    with pytest.raises(RuntimeError) as raised:
        workflow.run()  # image a.png is done, b.png fails to load
    assert str(_cause(raised.value, VolumeDataError)).startswith(f"{source / 'b.png'}: unreadable")
    assert _files(out) == []
