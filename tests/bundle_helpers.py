"""Helpers shared by the bundle tests (tests/bundles/): run a config as ``python -m monai.bundle run`` would,
check its exit, read its TensorBoard scalars, write NIfTI inputs. Importable because pyproject.toml puts
``tests`` on pytest's ``pythonpath``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # same float rounding in every run; modest CPU use


def run_bundle(configs: Path, config: str, overrides: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run --config_file configs/config --key value ...`` (lists / dicts as JSON)."""
    args = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(configs / config)]
    for key, value in overrides.items():
        args += [f"--{key}", json.dumps(value) if isinstance(value, (list, dict)) else str(value)]
    return subprocess.run(args, capture_output=True, encoding="utf-8", errors="replace", env=ENV, timeout=timeout,
                          cwd=REPO)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """Assert a zero exit (showing the run's output tail otherwise) and pass the process through."""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def fails(proc: subprocess.CompletedProcess, *messages: str) -> None:
    """Assert a non-zero exit whose stderr holds every one of ``messages``."""
    assert proc.returncode != 0, proc.stdout[-2000:]
    for message in messages:
        assert message in proc.stderr, proc.stderr[-3000:]


def causes(err: BaseException | None) -> list[BaseException]:
    """An exception and its causes, outermost first (MONAI wraps a failing config expression in a
    RuntimeError): the last one is what the library raised."""
    chain = []
    while err is not None:
        chain.append(err)
        err = err.__cause__
    return chain


def scalars(log_dir: Path, tag: str) -> dict[int, float]:
    """``{step: value}`` of a TensorBoard scalar over every event file in ``log_dir`` (trainer and evaluator
    write one file each; a later file wins on a repeated step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[int, float] = {}
    for events in sorted(log_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values.update({e.step: e.value for e in acc.Scalars(tag)})
    return values


def save_nifti(array: np.ndarray, path: Path, affine: np.ndarray | None = None, dtype: type = np.int16) -> Path:
    """Write ``array`` as NIfTI (identity affine unless given), creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array.astype(dtype), np.eye(4) if affine is None else affine), path)
    return path
