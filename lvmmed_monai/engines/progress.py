"""What a training run prints and leaves behind, the same for every bundle: a progress bar per epoch (on a
terminal only), one summary line per epoch, a final block, and ``report.json`` / ``report.png`` in the output
folder.

Why not MONAI's ``StatsHandler`` for the console: it prints each iteration's statistics (hundreds of lines,
interleaved with a progress bar on one terminal), then the trainer's metrics, the validator's metrics and the
key metric's best on separate lines per epoch, with no throughput or time left, and writes no summary file
or figure. The bundles keep ``StatsHandler`` for exceptions and for per-iteration lines when asked
(``log_every``), and ``TensorBoardStatsHandler`` for the details.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar

from lvmmed_monai.config_values import progress_enabled
from lvmmed_monai.io import atomic_open

__all__ = ["progress_enabled", "every", "output_scalars", "TrainingProgressBar", "TrainingSummary",
           "format_duration"]

logger = logging.getLogger(__name__)


def every(n: int | str, last: int | None = None) -> Any:
    """An ignite event filter for ``StatsHandler(iteration_log=...)``: every ``n``-th iteration (and iteration
    ``last``), or ``False`` (no iteration lines) when ``n`` is 0."""
    n = int(n)
    if n < 0:
        raise ValueError(f"log_every must be >= 0, got {n}")
    if n == 0:
        return False
    return lambda engine, event: event % n == 0 or event == last


def output_scalars(output: Any, keys: Sequence[str]) -> dict[str, float]:
    """The scalars ``keys`` of an iteration output: a dict (pretraining, detection) or MONAI's decollated list
    of per-sample dicts (each holds the batch loss; the first is read). Missing keys are left out."""
    if isinstance(output, Sequence) and not isinstance(output, (str, Mapping)):
        output = output[0] if output else {}
    if not isinstance(output, Mapping):
        raise TypeError(f"expected a dict or a list of dicts as the iteration output, got {type(output).__name__}")
    return {k: float(output[k].detach() if isinstance(output[k], torch.Tensor) else output[k])
            for k in keys if k in output}


def format_duration(seconds: float) -> str:
    """``42 s``, ``3 min 07 s`` or ``2 h 05 min``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class TrainingProgressBar(ProgressBar):
    """ignite's tqdm bar for one epoch, showing ``keys`` of the iteration output (a dict, or MONAI's decollated
    list of dicts); cleared at the epoch end (the epoch line stays). ``attach(engine)`` only, as MONAI bundle
    handler lists call it; ``enabled`` takes the ``progress_bar`` knob (``auto``: on a terminal only)."""

    def __init__(self, enabled: bool | str = "auto", keys: Sequence[str] = ("loss",), persist: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(persist=persist, **kwargs)
        self.enabled, self.keys = progress_enabled(enabled), tuple(keys)

    def attach(self, engine: Engine, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        if self.enabled:
            super().attach(engine, output_transform=lambda out: output_scalars(out, self.keys))


def _scalars(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The single-number entries of an engine's metrics (tensors of one element included)."""
    out = {}
    for name, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix + name] = float(value)
    return out


class TrainingSummary:
    """One line per epoch, a final block, and ``report.json`` / ``report.png`` in ``output_dir``.

    The epoch line: ``epoch 3/12 | loss 0.4521 | <shown metrics> | 412.0 img/s | 6.1 s | 55 s left``; the loss is
    the mean of the epoch's iteration losses, the metrics are the trainer's (e.g. pretraining's epoch means and
    online probe) and, on the epochs it ran, the validator's. ``report.json`` holds every epoch's record (all
    single-number metrics), the best key metric and the run time; it is rewritten atomically after every epoch,
    so a killed run keeps its curves and a resumed one (``resume``) continues them. ``report.png`` plots the
    loss and the shown metrics per epoch, at the end of the run.

    Attach it after the handlers that produce the metrics it reads (``ValidationHandler``,
    :class:`~lvmmed_monai.engines.OnlineProbe`): handlers fire in attach order.

    Args:
        output_dir: where the reports go (the bundle's output folder).
        batch_size: images per iteration (all processes together), for images/s; None shows iterations/s.
        validator: the validation engine, if any (its metrics join the epoch's record on the epochs it ran).
        show: metrics in the epoch line and the figure; default: the trainer's and the validator's key metric.
        loss_key: the loss's key in the iteration output.
        enabled: False on non-zero ranks.
        figure: write ``report.png`` (matplotlib) at the end.
    """

    def __init__(self, output_dir: str | os.PathLike, batch_size: int | None = None,
                 validator: Engine | None = None, show: Sequence[str] = (), loss_key: str = "loss",
                 enabled: bool = True, figure: bool = True) -> None:
        self.output_dir, self.batch_size, self.validator = Path(output_dir), batch_size, validator
        self.show, self.loss_key, self.enabled, self.figure = list(show), loss_key, enabled, figure
        self.history: list[dict[str, float]] = []
        self._trainer: Engine | None = None
        self._loss_sum, self._iters, self._epoch_start, self._run_start, self._epochs_run = 0.0, 0, 0.0, 0.0, 0

    @property
    def report_path(self) -> Path:
        return self.output_dir / "report.json"

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        self._trainer = engine
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    # ------------------------------------------------------------------ events
    def _started(self, engine: Engine) -> None:
        self._run_start, self._epochs_run, self.history = time.perf_counter(), 0, []

    def _earlier_epochs(self, epoch: int) -> list[dict[str, float]]:
        """The records of epochs 1..``epoch`` from an earlier run's report (a resumed run), else none."""
        if epoch == 0 or not self.report_path.is_file():
            return []
        try:
            earlier = json.loads(self.report_path.read_text())["epochs"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            logger.warning("%s is unreadable (%s); its curves start again at epoch %d", self.report_path, e, epoch + 1)
            return []
        return [r for r in earlier if isinstance(r, dict) and r.get("epoch", math.inf) <= epoch]

    def _epoch_started(self, engine: Engine) -> None:
        if not self._epochs_run and not self.history:  # first epoch of this run: a resumed one continues the curves
            self.history = self._earlier_epochs(engine.state.epoch - 1)
        self._loss_sum, self._iters, self._epoch_start = 0.0, 0, time.perf_counter()

    def _iteration_completed(self, engine: Engine) -> None:
        self._loss_sum += output_scalars(engine.state.output, [self.loss_key]).get(self.loss_key, math.nan)
        self._iters += 1

    def _epoch_completed(self, engine: Engine) -> None:
        seconds = time.perf_counter() - self._epoch_start
        self._epochs_run += 1
        record = {"epoch": engine.state.epoch, "iteration": engine.state.iteration, "time_s": round(seconds, 3),
                  "loss": self._loss_sum / max(self._iters, 1)}
        rate = self._iters * (self.batch_size or 1) / max(seconds, 1e-9)
        record["images_per_s" if self.batch_size else "iterations_per_s"] = round(rate, 3)
        record.update(_scalars(engine.state.metrics))
        if self.validator is not None and self.validator.state.epoch == engine.state.epoch:
            record.update(_scalars(self.validator.state.metrics))
        self.history.append(record)
        self._write_json(engine)
        logger.info(self.epoch_line(record, engine.state.max_epochs, self._time_left(engine)))

    def _completed(self, engine: Engine) -> None:
        elapsed = time.perf_counter() - self._run_start
        report = self._write_json(engine, finished=True)
        if self.figure and self.history:
            self._write_figure()
        lines = [f"done: {engine.state.epoch} epochs, {engine.state.iteration} iterations in "
                 f"{format_duration(elapsed)} (this run: {self._epochs_run} epochs)"]
        best = report.get("best")
        if best:
            lines.append(f"best {best['metric']} {best['value']:.4f} at epoch {best['epoch']}")
        if self.history:
            last = {k: v for k, v in self.history[-1].items() if k in self._shown(self.history[-1])}
            if last:
                lines.append("last epoch: " + ", ".join(f"{k} {v:.4f}" for k, v in last.items()))
        lines.append(f"outputs in {self.output_dir}: " + ", ".join(self._outputs()))
        for line in lines:
            logger.info(line)

    # ------------------------------------------------------------------ pieces
    def _shown(self, record: Mapping[str, float]) -> list[str]:
        if self.show:
            return [k for k in self.show if k in record]
        keys = [getattr(e.state, "key_metric_name", None) for e in (self._trainer, self.validator) if e is not None]
        return [k for k in keys if k and k in record]

    def epoch_line(self, record: Mapping[str, float], max_epochs: int | None, left: float | None) -> str:
        """The one line printed for an epoch's ``record``."""
        parts = [f"epoch {record['epoch']}/{max_epochs}", f"loss {record['loss']:.4g}"]
        parts += [f"{k} {record[k]:.4f}" for k in self._shown(record)]
        if "images_per_s" in record:
            parts.append(f"{record['images_per_s']:.1f} img/s")
        else:
            parts.append(f"{record['iterations_per_s']:.2f} it/s")
        parts.append(format_duration(record["time_s"]))
        if left is not None:
            parts.append(f"{format_duration(left)} left")
        return " | ".join(parts)

    def _time_left(self, engine: Engine) -> float | None:
        if not engine.state.max_epochs or not self._epochs_run:
            return None
        per_epoch = (time.perf_counter() - self._run_start) / self._epochs_run
        return per_epoch * (engine.state.max_epochs - engine.state.epoch)

    def _best(self) -> dict | None:
        """The best value of the key metric (the validator's, else the trainer's) over the recorded epochs, by the
        engine's own comparison (MONAI's ``metric_cmp_fn``, greater is better by default)."""
        for engine in (self.validator, self._trainer):
            name = getattr(getattr(engine, "state", None), "key_metric_name", None)
            rows = [r for r in self.history if name and name in r]
            if not rows:
                continue
            better = getattr(engine, "metric_cmp_fn", lambda current, prev: current > prev)
            best = rows[0]
            for row in rows[1:]:
                if better(row[name], best[name]):
                    best = row
            return {"metric": name, "value": best[name], "epoch": int(best["epoch"])}
        return None

    def _write_json(self, engine: Engine, finished: bool = False) -> dict:
        report = {"finished": finished, "epochs_done": engine.state.epoch, "max_epochs": engine.state.max_epochs,
                  "iterations": engine.state.iteration, "best": self._best(), "shown": self._shown(
                      self.history[-1]) if self.history else [], "epochs": self.history}
        if finished:
            report["run_time_s"] = round(time.perf_counter() - self._run_start, 3)
        with atomic_open(self.report_path, "w") as fh:
            json.dump(report, fh, indent=1)
        return report

    def _write_figure(self) -> Path:
        """``report.png``: the loss, and each shown metric, per epoch."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        from matplotlib import pyplot as plt
        from matplotlib.ticker import MaxNLocator

        shown = sorted({k for r in self.history for k in self._shown(r)})
        fig, axes = plt.subplots(1, 1 + bool(shown), figsize=(5 + 5 * bool(shown), 3.6), squeeze=False)
        epochs = [r["epoch"] for r in self.history]
        axes[0, 0].plot(epochs, [r["loss"] for r in self.history], marker="o", ms=3)
        axes[0, 0].set(title="training loss (epoch mean)", xlabel="epoch", ylabel="loss")
        if shown:
            for key in shown:
                rows = [r for r in self.history if key in r]
                axes[0, 1].plot([r["epoch"] for r in rows], [r[key] for r in rows], marker="o", ms=3, label=key)
            axes[0, 1].set(title="metrics", xlabel="epoch")
            axes[0, 1].legend(fontsize=8)
        for ax in axes.flat:
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.tight_layout()
        path = self.output_dir / "report.png"
        with atomic_open(path, "wb") as fh:
            fig.savefig(fh, format="png", dpi=100)
        plt.close(fig)
        return path

    def _outputs(self) -> list[str]:
        """The output folder's top-level entries (folders with a ``/``; TensorBoard's named), models/ listed."""
        names = []
        for entry in sorted(self.output_dir.iterdir()):
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                if entry.name == "models":
                    names += [f"models/{p.name}" for p in sorted(entry.iterdir()) if not p.name.startswith(".")]
                else:
                    names.append(entry.name + "/" + (" (TensorBoard)" if entry.name == "logs" else ""))
            else:
                names.append(entry.name)
        return names
