"""Engine pieces of the detection bundle (``bundles/lvmmed_det``): torchvision's Faster R-CNN driven by MONAI's
``SupervisedTrainer`` / ``SupervisedEvaluator``, scored with MONAI's COCO metric.

MONAI's engines take a network ``f(inputs, *args)`` and a loss ``L(pred, targets)``; torchvision's detectors
take a *list* of ``(C, H, W)`` images (sizes may differ) and, in training, a list of ``{"boxes", "labels"}``
targets, and return a dict of losses (train mode) or a list of ``{"boxes", "labels", "scores"}`` (eval mode).
What joins them, written here because MONAI has none of it for torchvision models:

* :class:`DetectionPrepareBatch`: a list of items (``monai.data.utils.no_collation``) -> images and targets
  (passed to the network as well in training), so the engines run unchanged;
* :class:`DetectionLoss`: the sum of the loss dict (torchvision's reference training), and
  :func:`detection_loss_terms` to log it;
* :func:`match_detections` / :func:`ap_from_matches` / :func:`average_precision`: AP at one IoU threshold per
  class with MONAI's maintained COCO implementation (``monai.apps.detection.metrics``: ``matching_batch`` +
  ``COCOMetric``, 101-point interpolation); :class:`DetectionAP` (an ignite metric, the mean over classes or
  one class) for the evaluators (one per class: :func:`~lvmmed_monai.engines.metrics.per_class_ap`);
* :class:`DetectionReport`: the predictions as a COCO-style JSON (and the metrics), written atomically.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine
from ignite.metrics import Metric
from monai.apps.detection.metrics.coco import COCOMetric
from monai.apps.detection.metrics.matching import matching_batch
from monai.data.box_utils import box_iou
from monai.engines.utils import PrepareBatch
from monai.handlers import from_engine
from monai.utils import convert_to_tensor
from torch import nn

from lvmmed_monai.engines.reporting import EvaluationReport

__all__ = ["DetectionPrepareBatch", "DetectionLoss", "detection_loss_terms",
           "match_detections", "ap_from_matches", "average_precision", "DetectionAP",
           "DetectionReport"]

logger = logging.getLogger(__name__)


class DetectionPrepareBatch(PrepareBatch):
    """A list of items -> ``(images, targets, args, {})`` for MONAI's engines: ``images`` a list of ``(C, H, W)``
    float tensors, ``targets`` a list of ``{"boxes": (K, 4) float32 xyxy, "labels": (K,) int64}`` (None when the
    items have no boxes: inference), both on ``device``. ``targets_to_network``: pass the targets to the network
    too (training: torchvision's detectors compute their losses from them)."""

    def __init__(self, targets_to_network: bool = True, image_key: str = "image", box_key: str = "boxes",
                 label_key: str = "labels") -> None:
        self.targets_to_network = bool(targets_to_network)
        self.image_key, self.box_key, self.label_key = image_key, box_key, label_key

    def __call__(self, batchdata: Sequence[Mapping[str, Any]], device: str | torch.device | None = None,
                 non_blocking: bool = False, **kwargs: Any) -> tuple:
        if not isinstance(batchdata, Sequence) or not all(isinstance(b, Mapping) for b in batchdata):
            raise TypeError("detection batches are lists of items: use collate_fn=monai.data.utils.no_collation")
        images = [convert_to_tensor(b[self.image_key], dtype=torch.float32, device=device, track_meta=False)
                  for b in batchdata]
        targets = None
        if all(self.box_key in b for b in batchdata):
            targets = [{"boxes": convert_to_tensor(b[self.box_key], dtype=torch.float32, device=device,
                                                   track_meta=False).reshape(-1, 4),
                        "labels": convert_to_tensor(b[self.label_key], dtype=torch.int64, device=device,
                                                    track_meta=False).reshape(-1)} for b in batchdata]
        args = (targets,) if self.targets_to_network and targets is not None else ()
        return images, targets, args, {}


class DetectionLoss(nn.Module):
    """The training loss of a torchvision detector: the sum of the terms of its loss dict (``loss_classifier``,
    ``loss_box_reg``, ``loss_objectness``, ``loss_rpn_box_reg`` for Faster R-CNN), as torchvision's reference
    training does; ``targets`` are unused (the network already used them)."""

    def forward(self, losses: Mapping[str, torch.Tensor], targets: Any = None) -> torch.Tensor:
        if not isinstance(losses, Mapping) or not losses:
            raise TypeError(f"expected the detector's dict of losses (train mode, targets given), got "
                            f"{type(losses).__name__}")
        return torch.stack([v.reshape(()) for v in losses.values()]).sum()


def detection_loss_terms(output: Mapping[str, Any]) -> dict[str, float]:
    """``{"train_loss": total, <term>: value...}`` of a detection trainer's output, for StatsHandler and
    TensorBoardStatsHandler (``output_transform``)."""
    terms = output.get("pred") if isinstance(output.get("pred"), Mapping) else {}
    return {"train_loss": float(output["loss"].detach()), **{k: float(v.detach()) for k, v in terms.items()}}


def _numpy(x: Any, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
    return np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=dtype).reshape(shape)


def match_detections(preds: Sequence[Mapping[str, Any]], targets: Sequence[Mapping[str, Any]],
                     iou_threshold: float = 0.5, max_detections: int = 100) -> list[dict]:
    """Per image and class, the greedy COCO matching of the predictions (``boxes`` ``(D, 4)`` xyxy, ``scores``,
    ``labels`` 1..C) to the targets (``boxes``, ``labels``) at ``iou_threshold``: MONAI's ``matching_batch``
    (classes shifted to 0..C-1, the indices ``COCOMetric`` takes)."""
    if len(preds) != len(targets):
        raise ValueError(f"{len(preds)} predictions for {len(targets)} targets; give one of each per image")
    return matching_batch(
        iou_fn=box_iou, iou_thresholds=[float(iou_threshold)], max_detections=int(max_detections),
        pred_boxes=[_numpy(p["boxes"], np.float64, (-1, 4)) for p in preds],
        pred_classes=[_numpy(p["labels"], np.int64, (-1,)) - 1 for p in preds],
        pred_scores=[_numpy(p["scores"], np.float64, (-1,)) for p in preds],
        gt_boxes=[_numpy(t["boxes"], np.float64, (-1, 4)) for t in targets],
        gt_classes=[_numpy(t["labels"], np.int64, (-1,)) - 1 for t in targets])


def ap_from_matches(matches: Sequence[Mapping[int, Mapping[str, np.ndarray]]], num_foreground: int,
                    iou_threshold: float = 0.5, max_detections: int = 100) -> np.ndarray:
    """``(num_foreground,)`` AP per class from :func:`match_detections` results (``COCOMetric``: the precision
    envelope at 101 recall points 0, 0.01, ..., 1, each the precision at the first rank reaching that recall, 0
    past the last recall reached, averaged). NaN for a class without a target box: ``COCOMetric`` would give it
    -1 and average that into its mAP; pycocotools leaves it out, and so do we."""
    present = sorted({c for m in matches for c, r in m.items() if 0 <= c < num_foreground and
                      np.count_nonzero(np.asarray(r["gtIgnore"]) == 0)})
    ap = np.full(int(num_foreground), np.nan)
    if not present:
        return ap
    index = {c: i for i, c in enumerate(present)}  # only classes with targets: no COCOMetric warnings
    remapped = [{index[c]: r for c, r in m.items() if c in index} for m in matches]
    metric = COCOMetric(classes=[str(c) for c in present], iou_list=[float(iou_threshold)],
                        iou_range=(float(iou_threshold), float(iou_threshold), 0.05),
                        max_detection=[int(max_detections)], per_class=True, verbose=False)
    values, _ = metric(remapped)
    for c in present:
        ap[c] = values[f"{c}_AP_IoU_{metric.iou_thresholds[0]:.2f}_MaxDet_{int(max_detections)}"]
    return ap


def average_precision(preds: Sequence[Mapping[str, Any]], targets: Sequence[Mapping[str, Any]], num_classes: int,
                      iou_threshold: float = 0.5, max_detections: int = 100) -> np.ndarray:
    """``(num_classes - 1,)`` AP per foreground class at ``iou_threshold`` over a set of images (one prediction
    and one target dict per image; ``num_classes`` counts the background, as torchvision's). NaN for a class
    without a target box; the mAP is the ``nanmean``."""
    return ap_from_matches(match_detections(preds, targets, iou_threshold, max_detections), int(num_classes) - 1,
                           iou_threshold, max_detections)


class DetectionAP(Metric):
    """AP at ``iou_threshold`` (0.5: "mAP@0.5") over an evaluation epoch, an ignite metric for MONAI evaluators:
    the mean over the classes with target boxes (``class_index`` None), or the AP of class ``class_index``
    (1..C). ``output_transform`` gives ``(preds, targets)``, lists of dicts (``from_engine(["pred", "label"])``
    on a not-decollated evaluator output). Matching runs per iteration; NaN when no class has a box."""

    def __init__(self, num_classes: int, class_index: int | None = None, iou_threshold: float = 0.5,
                 max_detections: int = 100, output_transform: Callable = from_engine(["pred", "label"]),
                 device: str | torch.device = "cpu") -> None:
        if int(num_classes) < 2 or (class_index is not None and not 1 <= int(class_index) < int(num_classes)):
            raise ValueError(f"need num_classes >= 2 (background + classes) and class_index in 1..{num_classes - 1}"
                             f" or None, got {num_classes}, {class_index}")
        self.num_classes, self.class_index = int(num_classes), class_index
        self.iou_threshold, self.max_detections = float(iou_threshold), int(max_detections)
        self._matches: list[dict] = []
        super().__init__(output_transform=output_transform, device=device, skip_unrolling=True)

    def reset(self) -> None:
        self._matches = []

    def _only(self, d: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The boxes of class ``class_index`` alone (each class is matched on its own anyway)."""
        keep = torch.as_tensor(d["labels"]).reshape(-1) == self.class_index
        return {k: torch.as_tensor(d[k])[keep] for k in ("boxes", "labels", "scores") if k in d}

    def update(self, output: tuple[Sequence[Mapping], Sequence[Mapping]]) -> None:
        preds, targets = output
        if self.class_index is not None:
            preds, targets = [self._only(p) for p in preds], [self._only(t) for t in targets]
        self._matches += match_detections(preds, targets, self.iou_threshold, self.max_detections)

    def compute(self) -> float:
        ap = ap_from_matches(self._matches, self.num_classes - 1, self.iou_threshold, self.max_detections)
        if self.class_index is not None:
            return float(ap[self.class_index - 1])
        return float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan")


class DetectionReport(EvaluationReport):
    """Write an evaluator's detections (and metrics) when its run ends; ``attach(engine)``.

    Reads each iteration's items (``engine.state.batch``: ``image_id``, ``file_name``, ``width``, ``height``)
    and predictions (``engine.state.output["pred"]``: boxes xyxy in the image's pixels, labels 1..C, scores);
    needs ``decollate=False``. Written through temporary files and renamed at the end of the run, so a run that
    fails midway leaves no partial file:

    * ``<output_dir>/<filename>.json``: COCO-style ``{"images", "categories", "annotations"}``, one annotation
      per detection with ``score``, ``bbox`` ``[x, y, w, h]`` and the model's ``category_id``
      (``categories[label - 1]``): pycocotools' result format, in a loadable dataset;
    * with ``metric_names``: ``<output_dir>/<metrics_filename>.json``, ``{"metrics": {name: value},
      "num_images", "iou_threshold", "categories"}`` (NaN as null).
    """

    def __init__(self, output_dir: str | os.PathLike, categories: Sequence[Mapping[str, Any]],
                 filename: str = "predictions", metric_names: Sequence[str] = (), metrics_filename: str = "metrics",
                 score_threshold: float = 0.0, iou_threshold: float = 0.5) -> None:
        self.output_dir, self.filename, self.metrics_filename = Path(output_dir), filename, metrics_filename
        self.categories = [{"id": c["id"], "name": str(c["name"])} for c in categories]
        self.metric_names, self.score_threshold = list(metric_names), float(score_threshold)
        self.iou_threshold = float(iou_threshold)
        self.images: list[dict] = []
        self.detections: list[dict] = []

    def _reset(self, engine: Engine) -> None:
        self.images, self.detections = [], []

    def _collect(self, engine: Engine) -> None:
        items, preds = engine.state.batch, engine.state.output["pred"]
        for item, pred in zip(items, preds, strict=True):
            self.images.append({"id": item["image_id"], "file_name": str(item["file_name"]),
                                "width": int(item["width"]), "height": int(item["height"])})
            keep = pred["scores"] >= self.score_threshold
            for box, label, score in zip(pred["boxes"][keep].tolist(), pred["labels"][keep].tolist(),
                                         pred["scores"][keep].tolist(), strict=True):
                if not 1 <= label <= len(self.categories):
                    raise ValueError(f"label {label} predicted, but the model has {len(self.categories)} categories "
                                     f"{[c['name'] for c in self.categories]}: num_classes must match the model")
                w, h = box[2] - box[0], box[3] - box[1]
                self.detections.append({"id": len(self.detections) + 1, "image_id": item["image_id"],
                                        "category_id": self.categories[label - 1]["id"],
                                        "bbox": [round(v, 4) for v in (box[0], box[1], w, h)],
                                        "area": round(w * h, 4), "score": round(score, 6), "iscrowd": 0})

    def _write(self, engine: Engine) -> None:
        metrics = self.engine_metrics(engine, self.metric_names)
        written = [self.write_json(self.output_dir / f"{self.filename}.json", {
            "images": self.images, "categories": self.categories, "annotations": self.detections}, indent=None)]
        if self.metric_names:
            written.append(self.write_json(self.output_dir / f"{self.metrics_filename}.json", {
                "metrics": metrics, "num_images": len(self.images), "iou_threshold": self.iou_threshold,
                "categories": self.categories}))
        self.finish(*written)
        logger.info("%d detection(s) in %d image(s) written to %s%s", len(self.detections), len(self.images),
                    ", ".join(map(str, written)),
                    f"; metrics {({k: round(v, 4) for k, v in metrics.items() if v is not None})}" if metrics else "")
