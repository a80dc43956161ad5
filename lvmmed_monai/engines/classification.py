"""Engine pieces of the 2D classification bundle (``bundles/lvmmed_cls``) on MONAI's engines.

* :class:`BalancedAccuracyMetric` / :class:`BalancedAccuracy`: balanced accuracy (the mean over classes of the
  recall; scikit-learn's ``balanced_accuracy_score``) as a MONAI metric and metric handler. MONAI's
  ``ConfusionMatrixMetric`` gives the per-class recall (its "balanced accuracy" is the binary, per-class
  ``(TPR + TNR) / 2``, another quantity), so the metric sums its confusion matrix over all images and averages
  the recalls; the handler logs one number through StatsHandler / TensorBoard. Accuracy and AUC come from
  ignite's ``Accuracy`` and MONAI's ``ROCAUC`` handler in the configs.
* :class:`ClassificationReport`: one row per image (file, label, predicted class, class probabilities) and,
  for a labeled set, the evaluator's metrics, written atomically at the end of a run.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine
from monai.handlers import IgniteMetricHandler
from monai.metrics import ConfusionMatrixMetric

from lvmmed_monai.engines.reporting import EvaluationReport, case_name

__all__ = ["BalancedAccuracyMetric", "BalancedAccuracy", "ClassificationReport"]

logger = logging.getLogger(__name__)


class BalancedAccuracyMetric(ConfusionMatrixMetric):
    """Balanced accuracy of one-hot predictions and labels, ``(B, C)`` each (``AsDiscrete(argmax=True,
    to_onehot=C)`` and ``AsDiscrete(to_onehot=C)``): ``mean_c TP_c / (TP_c + FN_c)`` over the classes that
    have at least one labeled image, counts summed over every image of the epoch (scikit-learn's
    ``balanced_accuracy_score``, which also leaves classes without a true sample out). NaN when no image."""

    def __init__(self) -> None:
        super().__init__(include_background=True, metric_name="sensitivity", compute_sample=False,
                         reduction="sum_batch")

    def aggregate(self, compute_sample: bool = False, reduction: Any = None) -> torch.Tensor:  # type: ignore[override]
        recall = super().aggregate(compute_sample=False, reduction="sum_batch")[0]  # (C,), NaN: no true sample
        return recall.nanmean() if bool(torch.isfinite(recall).any()) else recall.new_tensor(float("nan"))


class BalancedAccuracy(IgniteMetricHandler):
    """MONAI metric handler of :class:`BalancedAccuracyMetric` (``output_transform`` gives one-hot
    ``(y_pred, y)``, e.g. ``from_engine(["pred_onehot", "label_onehot"])``)."""

    def __init__(self, output_transform: Callable = lambda x: x, save_details: bool = False) -> None:
        super().__init__(metric_fn=BalancedAccuracyMetric(), output_transform=output_transform,
                         save_details=save_details)


def _as_index(value: Any) -> int:
    t = torch.as_tensor(value)
    return int(t.argmax()) if t.numel() > 1 else int(t.reshape(()))


class ClassificationReport(EvaluationReport):
    """Write an evaluator's per-image predictions (and metrics) when its run ends; ``attach(engine)``.

    Reads the decollated outputs: ``pred_key`` the class probabilities ``(C,)`` of each image (after
    ``Activationsd(softmax=True)``), ``label_key`` its class index (None: unlabeled data), the file name from
    the ``image_key`` tensor's metadata. Written through temporary files and renamed, so a run that fails
    midway leaves no partial table:

    * ``<output_dir>/<filename>.csv``: ``image, [label,] prediction, prob_<class>...`` (class names);
    * with ``metric_names``: ``<output_dir>/<metrics_filename>.json``, ``{"metrics": {name: value of
      engine.state.metrics}, "num_images": N, "classes": [...]}`` (NaN as null).
    """

    def __init__(self, output_dir: str | os.PathLike, class_names: Sequence[str], filename: str = "predictions",
                 label_key: str | None = None, metric_names: Sequence[str] = (), metrics_filename: str = "metrics",
                 pred_key: str = "pred", image_key: str = "image") -> None:
        self.output_dir, self.classes = Path(output_dir), [str(c) for c in class_names]
        if len(self.classes) < 2:
            raise ValueError(f"need the names of at least 2 classes, got {self.classes}")
        self.filename, self.metrics_filename, self.metric_names = filename, metrics_filename, list(metric_names)
        self.label_key, self.pred_key, self.image_key = label_key, pred_key, image_key
        self.rows: list[dict[str, Any]] = []

    def _reset(self, engine: Engine) -> None:
        self.rows = []

    def _collect(self, engine: Engine) -> None:
        output = engine.state.output
        for item in output if isinstance(output, list) else [output]:
            probs = torch.as_tensor(item[self.pred_key]).detach().float().cpu().reshape(-1)
            if probs.numel() != len(self.classes):
                raise ValueError(f"{probs.numel()} class scores per image, but {len(self.classes)} class names "
                                 f"{self.classes}; num_classes and class_names must match the model")
            row: dict[str, Any] = {"image": case_name(item, self.image_key, len(self.rows))}
            if self.label_key is not None:
                row["label"] = self.classes[_as_index(item[self.label_key])]
            row["prediction"] = self.classes[int(probs.argmax())]
            row.update({f"prob_{c}": float(p) for c, p in zip(self.classes, probs.tolist(), strict=True)})
            self.rows.append(row)

    def _write(self, engine: Engine) -> None:
        columns = ["image", *(["label"] if self.label_key is not None else []), "prediction",
                   *[f"prob_{c}" for c in self.classes]]
        written = [self.write_csv(self.output_dir / f"{self.filename}.csv", columns, self.rows)]
        metrics: Mapping[str, Any] = {}
        if self.metric_names:
            metrics = self.engine_metrics(engine, self.metric_names)
            written.append(self.write_json(self.output_dir / f"{self.metrics_filename}.json",
                                           {"metrics": metrics, "num_images": len(self.rows), "classes": self.classes}))
        self.finish(*written)
        summary = {k: round(v, 4) for k, v in metrics.items() if v is not None and not math.isnan(v)}
        logger.info("%d prediction(s) written to %s%s", len(self.rows), ", ".join(map(str, written)),
                    f"; metrics {summary}" if metrics else "")
