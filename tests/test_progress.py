"""TrainingSummary / TrainingProgressBar: one line per epoch, the final block, report.json / report.png, resume."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.engines import SupervisedEvaluator
from monai.handlers import MeanDice, ValidationHandler, from_engine
from PIL import Image

from lvmmed_monai.engines import (
    TrainingProgressBar,
    TrainingSummary,
    every,
    format_duration,
    output_scalars,
    progress_enabled,
)

LOSSES = [[1.0, 2.0, 6.0], [0.5, 0.5, 2.0], [3.0, 0.0, 0.0], [1.0, 1.0, 1.0]]  # per epoch, per iteration


def test_output_scalars_reads_dicts_and_decollated_lists():
    assert output_scalars({"loss": torch.tensor(2.5), "accuracy": 0.25, "other": 1}, ["loss", "accuracy"]) == {
        "loss": 2.5, "accuracy": 0.25}
    assert output_scalars([{"loss": torch.tensor(3.0)}, {"loss": torch.tensor(3.0)}], ["loss", "missing"]) == {
        "loss": 3.0}
    with pytest.raises(TypeError, match="dict or a list of dicts"):
        output_scalars(torch.tensor(1.0), ["loss"])


def test_every_and_progress_enabled_and_durations(monkeypatch):
    assert every(0) is False
    keep = every(3, last=7)
    assert [i for i in range(1, 10) if keep(None, i)] == [3, 6, 7, 9]
    with pytest.raises(ValueError, match="log_every"):
        every(-1)
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    monkeypatch.setattr("sys.stderr.isatty", lambda: False)
    assert progress_enabled("auto") is False and progress_enabled(True) is True and progress_enabled("false") is False
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    assert progress_enabled("auto") is True and TrainingProgressBar("auto").enabled
    monkeypatch.setattr("sys.stdout.isatty", lambda: False)  # stdout to a file or a pipe: no bar
    assert progress_enabled("auto") is False and not TrainingProgressBar("auto").enabled
    assert [format_duration(s) for s in (0.4, 59, 187, 7500)] == ["0 s", "59 s", "3 min 07 s", "2 h 05 min"]


def _trainer(losses: list[list[float]], max_epochs: int) -> Engine:
    """An engine whose iteration output is ``{"loss": losses[epoch - 1][i]}`` (3 iterations per epoch)."""
    def step(engine: Engine, batch: int) -> dict:
        return {"loss": torch.tensor(losses[engine.state.epoch - 1][batch])}

    trainer = Engine(step)
    trainer.state.max_epochs = max_epochs
    return trainer


def _validator() -> SupervisedEvaluator:
    """MONAI's evaluator with a key metric (Dice of a fixed prediction), as the bundles' validators are."""
    pred = torch.zeros(1, 2, 4, 4)
    pred[:, 1, :2] = 1  # foreground: the top 2 rows
    pred[:, 0] = 1 - pred[:, 1]
    label = torch.zeros(1, 2, 4, 4)
    label[:, 1, :, :2] = 1  # foreground: the left 2 columns; overlap 4 of 8 + 8 pixels
    label[:, 0] = 1 - label[:, 1]
    return SupervisedEvaluator(device="cpu", val_data_loader=[{"image": pred, "label": label}],
                               network=torch.nn.Identity(),
                               key_val_metric={"val_mean_dice": MeanDice(output_transform=from_engine(
                                   ["pred", "label"]))})


def _epoch_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "lvmmed_monai.engines.progress"
            and r.getMessage().startswith("epoch ")]


def test_summary_prints_one_line_per_epoch_and_writes_the_report(tmp_path, caplog):
    trainer, validator = _trainer(LOSSES, 4), _validator()
    ValidationHandler(validator=validator, interval=2, epoch_level=True).attach(trainer)
    TrainingSummary(tmp_path, batch_size=8, validator=validator).attach(trainer)
    with caplog.at_level(logging.INFO):
        trainer.run([0, 1, 2], max_epochs=4)
    dice = 2 * 4 / (8 + 8)  # the validator's fixed prediction, by hand
    lines = _epoch_lines(caplog)
    assert len(lines) == 4, lines
    for epoch, line in enumerate(lines, 1):
        assert line.startswith(f"epoch {epoch}/4 | loss {np.mean(LOSSES[epoch - 1]):.4g} | "), line
        assert ("val_mean_dice" in line) == (epoch % 2 == 0), line  # on the epochs validation ran only
        assert re.search(r"\| [\d.]+ img/s \| \d+ s \| \d+ s left$", line), line
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["finished"] and report["epochs_done"] == 4 and report["iterations"] == 12
    assert [r["epoch"] for r in report["epochs"]] == [1, 2, 3, 4]
    assert [r["loss"] for r in report["epochs"]] == pytest.approx([np.mean(x) for x in LOSSES])
    assert [r.get("val_mean_dice") for r in report["epochs"]] == pytest.approx([None, dice, None, dice])
    assert report["best"] == {"metric": "val_mean_dice", "value": pytest.approx(dice), "epoch": 2}  # ties: first
    final = [r.getMessage() for r in caplog.records if r.name == "lvmmed_monai.engines.progress"][4:]
    assert final[0].startswith("done: 4 epochs, 12 iterations in ") and final[1].startswith("best val_mean_dice")
    assert final[-1] == f"outputs in {tmp_path}: report.json, report.png"
    with Image.open(tmp_path / "report.png") as png:
        assert png.format == "PNG" and png.size == (1000, 360)


def test_summary_of_a_resumed_run_continues_the_earlier_curves(tmp_path, caplog):
    first = _trainer(LOSSES, 4)
    TrainingSummary(tmp_path, figure=False).attach(first)
    first.run([0, 1, 2], max_epochs=4)
    later = [[10 * v for v in epoch] for epoch in LOSSES]
    resumed = _trainer(later, 4)
    resumed.load_state_dict({"epoch": 2, "epoch_length": 3, "max_epochs": 4})  # as from a checkpoint
    TrainingSummary(tmp_path, figure=False).attach(resumed)
    caplog.clear()  # the first run's lines, where another test left the root logger at INFO
    with caplog.at_level(logging.INFO):
        resumed.run([0, 1, 2])
    report = json.loads((tmp_path / "report.json").read_text())
    assert [r["epoch"] for r in report["epochs"]] == [1, 2, 3, 4]
    expected = [np.mean(LOSSES[0]), np.mean(LOSSES[1]), np.mean(later[2]), np.mean(later[3])]
    assert [r["loss"] for r in report["epochs"]] == pytest.approx(expected)
    assert [line.split(" |")[0] for line in _epoch_lines(caplog)] == ["epoch 3/4", "epoch 4/4"]
    assert "iterations_per_s" in report["epochs"][-1]  # no batch size given


def test_summary_disabled_attaches_nothing(tmp_path):
    trainer = _trainer(LOSSES, 1)
    before = {event: len(handlers) for event, handlers in trainer._event_handlers.items()}
    TrainingSummary(tmp_path, enabled=False).attach(trainer)
    assert {event: len(handlers) for event, handlers in trainer._event_handlers.items()} == before
    trainer.run([0, 1, 2], max_epochs=1)
    assert not (tmp_path / "report.json").exists()
