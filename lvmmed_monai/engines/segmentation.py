"""Engine pieces of the 2D / slice-by-slice segmentation bundle (``bundles/lvmmed_seg``) on MONAI's engines
(its per-class Dice / IoU handlers: :mod:`lvmmed_monai.engines.metrics`).

* :class:`SegmentationReport`: per-case Dice / IoU per class (the details MONAI's metric handlers keep: one row
  per evaluated image or volume, so a volume's metrics are those of the whole reassembled volume) and their
  means, written to CSV and JSON atomically at the end of an evaluation.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from ignite.engine import Engine

from lvmmed_monai.engines.reporting import EvaluationReport, case_name, finite_or_none

__all__ = ["SegmentationReport"]

logger = logging.getLogger(__name__)


class SegmentationReport(EvaluationReport):
    """Write the per-case details of an evaluator's metrics and their means at the end of its run.

    Each metric of ``metric_names`` must be a MONAI metric handler of the evaluator with ``save_details=True``
    (``MeanDice``, ``MeanIoUHandler``): its ``engine.state.metric_details[name]`` holds one row per evaluated
    item (a 2D image or a whole 3D volume) and one column per class. Written with atomic renames:

    * ``<output_dir>/<filename>.csv``: ``case, label, <metric>_<class>..., <metric>_mean...`` per case, then a
      ``mean`` row (NaN, written empty, where a class is absent from a case's label: MONAI's ``ignore_empty``;
      ``<metric>_mean`` is the mean over the case's classes, and in the mean row over all cases and classes:
      the value the metric handler itself reports);
    * ``<output_dir>/<filename>.json``: ``{"cases": [...], "mean": {...}, "num_cases": N}`` (NaN as null).

    Means skip NaN, as MONAI's ``mean`` reduction does. ``class_names`` names all classes (background first);
    ``include_background`` must be the metric handlers' own.
    """

    def __init__(self, output_dir: str | os.PathLike, num_classes: int, metric_names: Sequence[str] = ("dice", "iou"),
                 class_names: Sequence[str] | None = None, include_background: bool = False,
                 image_key: str = "image", label_key: str = "label", filename: str = "metrics") -> None:
        names = list(class_names) if class_names else [str(c) for c in range(int(num_classes))]
        if len(names) != int(num_classes):
            raise ValueError(f"{len(names)} class names {names} for num_classes={num_classes}")
        self.output_dir, self.filename = Path(output_dir), filename
        self.metric_names, self.classes = list(metric_names), names[0 if include_background else 1:]
        self.image_key, self.label_key = image_key, label_key
        self.cases: list[tuple[str, str]] = []

    def _reset(self, engine: Engine) -> None:
        self.cases = []

    def _collect(self, engine: Engine) -> None:
        batch = engine.state.batch
        items = batch if isinstance(batch, list) else [batch]
        for item in items:
            n = len(self.cases)
            self.cases.append((case_name(item, self.image_key, n), case_name(item, self.label_key, n)))

    def rows(self, details: Mapping[str, torch.Tensor]) -> tuple[list[dict], dict[str, float]]:
        """Per-case rows and the means from ``{metric: (N, classes) values}``."""
        table: dict[str, list[float]] = {}
        for name in self.metric_names:
            values = torch.as_tensor(details[name], dtype=torch.float64).reshape(len(self.cases), -1)
            if values.shape[1] != len(self.classes):
                raise ValueError(f"metric {name} has {values.shape[1]} classes per case, expected {self.classes}")
            for c, cls in enumerate(self.classes):
                table[f"{name}_{cls}"] = values[:, c].tolist()
            table[f"{name}_mean"] = values.nanmean(1).tolist()
        rows = [{"case": case, "label": label, **{k: v[i] for k, v in table.items()}}
                for i, (case, label) in enumerate(self.cases)]
        means = {k: float(torch.tensor(v, dtype=torch.float64).nanmean()) for k, v in table.items()}
        for name in self.metric_names:  # over all cases and classes, as the metric handler's own mean
            means[f"{name}_mean"] = float(torch.as_tensor(details[name], dtype=torch.float64).nanmean())
        return rows, means

    def _write(self, engine: Engine) -> None:
        details = getattr(engine.state, "metric_details", None) or {}
        missing = [n for n in self.metric_names if n not in details]
        if missing:
            raise ValueError(f"no per-case details of {missing} (metrics with details: {sorted(details)}); the "
                             "evaluator needs MONAI metric handlers of these names with save_details=True")
        rows, means = self.rows(details)
        columns = list(rows[0]) if rows else ["case", "label"]
        csv_path = self.write_csv(self.output_dir / f"{self.filename}.csv", columns,
                                  [*rows, {"case": "mean", "label": "", **means}])
        report = {"cases": [{k: finite_or_none(v) if isinstance(v, float) else v for k, v in r.items()}
                            for r in rows],
                  "mean": {k: finite_or_none(v) for k, v in means.items()}, "num_cases": len(rows)}
        json_path = self.write_json(self.output_dir / f"{self.filename}.json", report)
        self.finish(csv_path, json_path)
        logger.info("metrics of %d case(s) written to %s and %s; means %s", len(rows), csv_path, json_path,
                    {k: round(v, 4) for k, v in means.items() if k.endswith("_mean")})
