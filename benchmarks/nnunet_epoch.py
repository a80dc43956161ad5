"""Seconds per epoch and final validation Dice: LVMMedTrainer vs nnU-Net's default trainer, same data/epochs.

Both run through the real ``nnUNetv2_train`` on a tiny generated 2D dataset (planned by nnU-Net), one after
the other in this run, alternating for ``--rounds`` rounds (the median round counts, so a burst of load from
other processes hits one round, not one side); both use the same ``nnUNet_n_proc_DA`` data-augmentation
workers. LVMMedTrainer gets generated weights in the official ResNet-50 layout (random
values: this measures cost, not the benefit of LVM-Med pretraining). The last line is the ratio of mean
epoch times, LVMMedTrainer / nnUNetTrainer (goal on CPU: <= 1.3).

``--size`` is the side of the generated images (nnU-Net plans the patch and batch from it). The default,
128, is still a tiny dataset; at 64 x 64 ResNet-50's fixed size dominates (measured on the idle 2-core CPU,
one round: 64 px 31.14 vs 57.32 s per epoch, ratio 1.841; 128 px 104.97 vs 106.39 s, ratio 1.014).

    python benchmarks/nnunet_epoch.py --epochs 1 --device cpu [--rounds 3] [--size 128]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lvmmed_monai.data import official_resnet50_state
from lvmmed_monai.demo.synthetic import write_nnunet_raw_dataset
from nnunet_plugin import PLUGIN_DIR

BIN = Path(sys.executable).parent


def trainer_names(epochs: int) -> tuple[str, str]:
    suffix = "1epoch" if epochs == 1 else f"{epochs}epochs"
    return f"nnUNetTrainer_{suffix}", f"LVMMedTrainer_{suffix}"


def run(trainer: str, env: dict[str, str], device: str, dataset_id: int) -> tuple[list[float], float, float]:
    start = time.perf_counter()
    proc = subprocess.run([str(BIN / "nnUNetv2_train"), str(dataset_id), "2d", "0", "-tr", trainer, "-device", device],
                          env=env, capture_output=True, encoding="utf-8", errors="replace")
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{trainer} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    epochs = [float(x) for x in re.findall(r"Epoch time: ([0-9.]+) s", proc.stdout)]
    dice = float(re.findall(r"Mean Validation Dice:\s+([0-9.]+)", proc.stdout)[-1])
    return epochs, dice, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=1, choices=[1, 5, 10, 20, 50])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--size", type=int, default=128, help="image side of the generated dataset")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--rounds", type=int, default=1, help="alternating runs of both trainers")
    parser.add_argument("--da-workers", default="2", help="nnUNet_n_proc_DA for both trainers")
    args = parser.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="nnunet_bench_"))
    dataset_id = 502
    env = dict(os.environ, nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "pre"),
               nnUNet_results=str(root / "res"), nnUNet_extTrainer=str(PLUGIN_DIR), nnUNet_n_proc_DA=args.da_workers)
    write_nnunet_raw_dataset(root / "raw", dataset_id, num_cases=args.cases, size=args.size)
    subprocess.run([str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id), "-c", "2d", "-np", "1"],
                   env=env, check=True, capture_output=True)
    weights = root / "lvmmed_resnet.torch"
    torch.save(official_resnet50_state(), weights)
    env["LVMMED_WEIGHTS"] = str(weights)
    baseline, ours = trainer_names(args.epochs)
    per_round: dict[str, list[float]] = {baseline: [], ours: []}
    for r in range(args.rounds):
        for name in (baseline, ours):
            epochs, dice, wall = run(name, env, args.device, dataset_id)
            per_round[name].append(sum(epochs) / len(epochs))
            print(f"round {r}  {name:28s} epochs {len(epochs)}  s/epoch {per_round[name][-1]:8.2f}  "
                  f"val Dice {dice:.4f}  wall {wall:.1f} s", flush=True)
    med = {name: statistics.median(times) for name, times in per_round.items()}
    print(f"median s/epoch: {baseline} {med[baseline]:.2f}, {ours} {med[ours]:.2f}")
    print(f"epoch-time ratio {ours}/{baseline}: {med[ours] / med[baseline]:.3f}")


if __name__ == "__main__":
    main()
