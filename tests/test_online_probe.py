"""OnlineProbe: kNN accuracy of the frozen encoder during pretraining, at the probe epochs, in the epoch
metrics, without changing training (same losses, weights and BatchNorm buffers with and without it)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from bundle_helpers import REPO, ok, run_bundle, scalars
from ignite.engine import Engine, Events
from PIL import Image

from lvmmed_monai.demo.phantoms import _chest_xray
from lvmmed_monai.engines import OnlineProbe, build_encoder

CONFIGS = REPO / "bundles" / "lvmmed_pretrain" / "configs"


@pytest.fixture(scope="module")
def encoder() -> torch.nn.Module:
    return build_encoder("lvmmed_resnet50", 32)


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_probe_epochs_put_an_accuracy_in_the_metrics_and_keep_train_mode(encoder, one_thread, caplog):
    """interval 2 over 3 epochs: epochs 2 and 3 (the last) are probed, epoch 1 has no value; the encoder is back
    in train mode for the next iteration, and the step a handler after the probe sees includes the value."""
    opt = torch.optim.SGD(encoder.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)

    def step(engine: Engine, _batch) -> float:
        assert encoder.training
        opt.zero_grad()
        loss = encoder.feature_map(torch.rand(4, 3, 32, 32, generator=gen)).pow(2).mean()
        loss.backward()
        opt.step()
        return loss.item()

    engine, seen = Engine(step), {}
    encoder.train()
    OnlineProbe(encoder, 32, interval=2, num_train=24, num_test=24, k=3).attach(engine)
    engine.add_event_handler(Events.EPOCH_COMPLETED,
                             lambda e: seen.update({e.state.epoch: (dict(e.state.metrics), encoder.training)}))
    with caplog.at_level(logging.DEBUG, logger="lvmmed_monai.engines.handlers"):
        engine.run([0], max_epochs=3)
    assert "probe_knn_accuracy" not in seen[1][0]
    assert all(0.0 <= seen[e][0]["probe_knn_accuracy"] <= 1.0 for e in (2, 3))
    assert all(training for _, training in seen.values()) and encoder.training
    # described once at INFO; the later values only in DEBUG (the epoch line shows them)
    assert [r.levelname for r in caplog.records if "online kNN probe" in r.getMessage()] == ["INFO", "DEBUG"]


def test_probe_touches_no_buffer_no_rng_and_restores_the_mode(encoder, one_thread, tmp_path):
    encoder.train()
    before, rng = _state(encoder), torch.get_rng_state()
    probe = OnlineProbe(encoder, 32, num_train=16, num_test=16, k=3, seed=3)
    value = probe.compute()
    assert 0.0 <= value <= 1.0 and encoder.training
    assert torch.equal(torch.get_rng_state(), rng)  # the hold-out comes from its own generators
    after = _state(encoder)
    assert all(torch.equal(before[k], after[k]) for k in before)  # no running-stat updates
    assert probe.compute() == value  # the hold-out is built once, the same each time
    assert OnlineProbe(encoder, 32, num_train=16, num_test=16, k=3, seed=3).compute() == value
    encoder.eval()
    probe.compute()
    assert not encoder.training  # an encoder in eval mode stays there
    encoder.train()

    rng = np.random.default_rng(0)  # a labelled folder: 2 classes, split 50/50 by a seeded permutation
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(4):
            Image.fromarray((_chest_xray(rng, 32) * 255).astype(np.uint8)).save(tmp_path / name / f"{i}.png")
    folder = OnlineProbe(encoder, 32, data=tmp_path, k=3)
    xtr, ytr, xte, yte = folder.holdout()
    assert xtr.shape == (4, 1, 32, 32) and len(yte) == 4 and set(torch.cat([ytr, yte]).tolist()) == {0, 1}
    assert 0.0 <= folder.compute() <= 1.0
    with pytest.raises(ValueError, match="does not move"):
        OnlineProbe(encoder, 32, device="meta").compute()
    with pytest.raises(ValueError, match="interval"):
        OnlineProbe(encoder, 32, interval=-1)


@pytest.fixture(scope="module")
def bundle_runs(module_tmp) -> dict[str, Path]:
    """The pretraining bundle twice on 16 PNGs, 3 epochs of 1 iteration: probe every 2 epochs, and no probe."""
    root = module_tmp("probe")
    rng = np.random.default_rng(0)
    (root / "data").mkdir()
    for i in range(16):
        Image.fromarray((_chest_xray(rng, 48) * 255).astype(np.uint8)).save(root / "data" / f"x{i}.png")
    base = {"data": str(root / "data"), "cache_dir": str(root / "cache"), "image_size": 32, "batch_size": 16,
            "graph_size": 8, "k": 3, "gamma": 4, "num_workers": 0, "max_epochs": 3,
            "ckpt_interval": 100, "first_order_warmup": 1, "train#main_handlers#0#num_train": 40,
            "train#main_handlers#0#num_test": 40}
    runs = {}
    for label, interval in (("probe", 2), ("plain", 0)):
        runs[label] = root / label
        proc = ok(run_bundle(CONFIGS, "train.yaml", {**base, "output_dir": str(root / label),
                                                     "probe_interval": interval}))
        (root / f"{label}.log").write_text(proc.stdout + proc.stderr)
    return runs


def test_bundle_logs_the_probe_at_probe_epochs_in_the_epoch_line_and_tensorboard(bundle_runs):
    probe = scalars(bundle_runs["probe"] / "logs", "probe_knn_accuracy")
    assert sorted(probe) == [2, 3] and all(0.0 <= v <= 1.0 for v in probe.values())
    assert scalars(bundle_runs["plain"] / "logs", "probe_knn_accuracy") == {}
    log = (bundle_runs["probe"].parent / "probe.log").read_text()
    epoch_lines = [line for line in log.splitlines() if re.search(r" - epoch \d+/3 \| loss ", line)]
    assert len(epoch_lines) == 3, log[-3000:]
    assert ["probe_knn_accuracy" in line for line in epoch_lines] == [False, True, True]
    report = json.loads((bundle_runs["probe"] / "report.json").read_text())
    assert {r["epoch"]: r["probe_knn_accuracy"] for r in report["epochs"] if "probe_knn_accuracy" in r} == (
        pytest.approx(probe))


def test_bundle_console_is_one_line_per_epoch_and_a_final_block(bundle_runs):
    """Not a terminal (CI): no progress bar, no per-iteration lines, no ignite engine chatter; the report's
    per-epoch loss is TensorBoard's per-iteration loss (1 iteration per epoch here)."""
    log = (bundle_runs["plain"].parent / "plain.log").read_text()
    assert "Iter:" not in log and "%|" not in log and "ignite.engine.engine" not in log, log[-3000:]
    ours = [line.split(" - INFO - ", 1)[1] for line in log.splitlines()
            if " - lvmmed_monai.engines.progress - " in line]
    assert [line.split(" |")[0] for line in ours[:3]] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"], ours
    assert ours[3].startswith("done: 3 epochs, 3 iterations in ") and "best epoch_retrieval_accuracy" in ours[4]
    assert "models/lvmmed_resnet.torch" in ours[-1] and "report.png" in ours[-1] and "logs/ (TensorBoard)" in ours[-1]
    report = json.loads((bundle_runs["plain"] / "report.json").read_text())
    assert report["finished"] and [r["loss"] for r in report["epochs"]] == pytest.approx(
        [v for _, v in sorted(scalars(bundle_runs["plain"] / "logs", "loss").items())])
    assert (bundle_runs["plain"] / "report.png").stat().st_size > 10_000


def test_bundle_probe_does_not_change_training(bundle_runs):
    """Same per-iteration losses and statistics, same final encoder weights and BatchNorm buffers, bit for bit."""
    logs = {label: run / "logs" for label, run in bundle_runs.items()}
    for tag in ("loss", "accuracy", "retrieval_accuracy", "objective", "grad_norm"):
        values = scalars(logs["probe"], tag)
        assert sorted(values) == [1, 2, 3] and values == scalars(logs["plain"], tag), tag
    a, b = (torch.load(run / "checkpoints" / "checkpoint_final_iteration=3.pt", weights_only=True)
            for run in (bundle_runs["probe"], bundle_runs["plain"]))
    for part in ("encoder", "criterion"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert any("running_mean" in k for k in a["encoder"])  # BatchNorm buffers are among those compared
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])  # the global stream was not drawn from
