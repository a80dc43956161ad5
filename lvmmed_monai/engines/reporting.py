"""The base and the helpers shared by the evaluation reports (:class:`~lvmmed_monai.engines.SegmentationReport`,
:class:`~lvmmed_monai.engines.ClassificationReport`, :class:`~lvmmed_monai.engines.DetectionReport`)."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events

from lvmmed_monai.io import atomic_open, make_readable

__all__ = ["case_name", "finite_or_none", "EvaluationReport"]


def case_name(item: Any, key: str, index: int) -> str:
    """The file an evaluated item came from (its ``key``'s MetaTensor ``filename_or_obj``), else ``case_<index>``."""
    meta = getattr(item.get(key), "meta", None) if isinstance(item, Mapping) else None
    name = meta.get("filename_or_obj") if meta else None
    return str(name) if name else f"case_{index}"


def finite_or_none(value: float) -> float | None:
    """NaN as None, so JSON reports hold ``null`` instead of the non-standard ``NaN``."""
    return None if math.isnan(value) else value


class EvaluationReport:
    """Base of the evaluation reports: collect per-item results over an evaluator's epoch (``_reset`` at its
    start, ``_collect`` after each iteration) and write files when it ends (``_write``), through temporary files
    renamed into place and made readable, so a run that fails midway leaves no partial table; ``attach(engine)``
    as MONAI handler lists call it. Subclasses implement the three steps with the helpers below.
    """

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        raise NotImplementedError

    def _collect(self, engine: Engine) -> None:
        raise NotImplementedError

    def _write(self, engine: Engine) -> None:
        raise NotImplementedError

    @staticmethod
    def engine_metrics(engine: Engine, names: Sequence[str]) -> dict[str, float | None]:
        """``{name: engine.state.metrics[name]}`` (NaN as None); a clear error naming the missing ones."""
        missing = [n for n in names if n not in engine.state.metrics]
        if missing:
            raise ValueError(f"no metric {missing} on the evaluator (its metrics: {sorted(engine.state.metrics)})")
        return {n: finite_or_none(float(engine.state.metrics[n])) for n in names}

    @staticmethod
    def write_csv(path: Path, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> Path:
        """A CSV table, atomically (NaN written as an empty cell)."""
        with atomic_open(path, "w") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(columns), lineterminator="\n")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: "" if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()})
        return path

    @staticmethod
    def write_json(path: Path, obj: Any, indent: int | None = 2) -> Path:
        """A JSON file, atomically."""
        with atomic_open(path, "w") as fh:
            json.dump(obj, fh, indent=indent)
        return path

    @staticmethod
    def finish(*paths: Path) -> None:
        """Give the written files the usual permissions (temporary files are created 0600)."""
        make_readable(*paths)
