"""Make the documentation figures from a real run of the ``lvmmed_seg`` bundle.

    .venv/bin/python scripts/make_figures.py --out docs/figures                 # train, infer, plot
    .venv/bin/python scripts/make_figures.py --out docs/figures --logdir outputs/lvmmed_seg/logs

By default the bundle's ``train.yaml`` runs as documented (generated CT-like phantoms, random initialisation)
into ``--run_dir``, its ``inference.yaml`` segments one validation volume with the best checkpoint, and two PNGs
are written to ``--out``: ``training_curve.png`` (training loss per iteration and validation Dice per epoch,
read from the run's TensorBoard event files) and ``overlay.png`` (input, label and prediction of one slice).
The figures come from the same commands users run, so they show what those commands do, not a mock-up.
``--logdir`` plots an existing run instead of training; its overlay is drawn when the folder above the logs is
a ``train.yaml`` output folder (``models/model_best.pt``, generated data) with the default network keys
(its predictions go to ``figure_predictions/`` there).
Every file is written to a temporary file and renamed; a new run is built in a temporary folder and renamed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "lvmmed_seg" / "configs"
CLASS_COLOURS = ("#e41a1c", "#ffd92f", "#4daf4a", "#377eb8", "#984ea3")  # label k > 0 -> CLASS_COLOURS[k - 1]

__all__ = ["read_scalars", "plot_training_curve", "plot_overlay", "save_figure", "main"]


def read_scalars(logdir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in the TensorBoard event files under ``logdir``: ``{tag: [(step, value), ...]}``.

    Each file is read on its own (MONAI writes the trainer's and the evaluator's series to separate files,
    whose steps are iterations and epochs; one accumulator over the folder would treat the step regression as
    a restart and purge data). Where several runs logged the same tag and step, the latest write wins.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(p for p in Path(logdir).rglob("events.out.tfevents.*") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no TensorBoard event files under {logdir}")
    latest: dict[str, dict[int, tuple[float, float]]] = {}
    for path in files:
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            series = latest.setdefault(tag, {})
            for event in acc.Scalars(tag):
                if event.step not in series or event.wall_time >= series[event.step][0]:
                    series[event.step] = (event.wall_time, float(event.value))
    return {tag: sorted((step, v) for step, (_, v) in series.items()) for tag, series in latest.items()}


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Save ``fig`` as a PNG through a temporary file and a rename (mode 0644 less the umask), then close it."""
    from lvmmed_monai.io import atomic_open, make_readable

    try:
        with atomic_open(path, "wb", suffix=".png") as fh:
            fig.savefig(fh, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    make_readable(path)
    return Path(path)


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last ``window`` values at every point (shorter windows at the start)."""
    sums = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    return (sums[idx] - sums[np.maximum(idx - window, 0)]) / np.minimum(idx, window)


def plot_training_curve(logdir: str | os.PathLike, out_png: str | os.PathLike, loss_tag: str = "train_loss",
                        dice_tag: str = "val_mean_dice", title: str | None = None) -> Path:
    """Two panels from a run's event files: ``loss_tag`` per iteration (with a one-epoch moving average) and
    ``dice_tag`` plus every per-class ``val_dice_*`` series per epoch. Returns the PNG's path."""
    scalars = read_scalars(logdir)
    for tag in (loss_tag, dice_tag):
        if tag not in scalars:
            raise KeyError(f"{logdir}: no scalar {tag!r}; found {sorted(scalars)}")
    steps, loss = (np.array(v) for v in zip(*scalars[loss_tag], strict=True))
    epochs, dice = (np.array(v) for v in zip(*scalars[dice_tag], strict=True))
    per_epoch = max(1, round(len(steps) / max(len(epochs), 1)))
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(9, 3.4), layout="constrained")
    ax_loss.plot(steps, loss, color="0.7", lw=1, label=f"{loss_tag} (per iteration)")
    ax_loss.plot(steps, _moving_average(loss, per_epoch), color="C0", lw=2, label=f"mean of {per_epoch} iterations")
    ax_loss.set(xlabel="iteration", ylabel="Dice + CE loss", title="training loss")
    ax_loss.legend(fontsize=8)
    ax_loss.grid(alpha=0.3)
    for tag in sorted(t for t in scalars if t.startswith("val_dice_")):
        e, v = zip(*scalars[tag], strict=True)
        ax_dice.plot(e, v, lw=1, marker=".", label=tag)
    ax_dice.plot(epochs, dice, color="k", lw=2, marker="o", ms=3, label=dice_tag)
    ax_dice.set(xlabel="epoch", ylabel="Dice", ylim=(0, 1), title="validation Dice (whole volumes)")
    ax_dice.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_dice.legend(fontsize=8)
    ax_dice.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, out_png)


def _dice(pred: np.ndarray, label: np.ndarray, k: int) -> float:
    """Dice of class ``k`` over a whole volume (NaN where the class is in neither)."""
    p, t = pred == k, label == k
    denom = p.sum() + t.sum()
    return float("nan") if denom == 0 else float(2 * (p & t).sum() / denom)


def plot_overlay(image: np.ndarray, label: np.ndarray, pred: np.ndarray, out_png: str | os.PathLike,
                 class_names: Sequence[str] | None = None, slice_axis: int = 2, title: str | None = None) -> Path:
    """Input, label and prediction of one slice of a volume (the one with the most labelled pixels of the
    rarest class, so every class shows), labels drawn over the input; Dice per class of the whole volume in
    the prediction's title. 2D arrays are drawn as they are. Returns the PNG's path."""
    image, label, pred = (np.asarray(a) for a in (image, label, pred))
    if not image.shape == label.shape == pred.shape:
        raise ValueError(f"shapes differ: image {image.shape}, label {label.shape}, prediction {pred.shape}")
    num_classes = int(max(label.max(), pred.max())) + 1
    names = list(class_names or [f"class {k}" for k in range(num_classes)])
    dices = {names[k]: _dice(pred, label, k) for k in range(1, num_classes)}
    if image.ndim == 3:
        counts = np.stack([(label == k).sum(axis=tuple(a for a in range(3) if a != slice_axis))
                           for k in range(1, num_classes)])
        rarest = int(np.argmin(np.where(counts.sum(1) > 0, counts.sum(1), np.inf)))
        index = int(np.argmax(counts[rarest]))
        image, label, pred = (np.take(a, index, axis=slice_axis) for a in (image, label, pred))
        where = f"slice {index} (axis {slice_axis})"
    else:
        where = "image"
    lo, hi = np.percentile(image, [0.5, 99.5])
    cmap = ListedColormap([(0, 0, 0, 0), *CLASS_COLOURS[: num_classes - 1]])
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.6), layout="constrained")
    scores = ", ".join(f"{n} {d:.2f}" for n, d in dices.items() if not np.isnan(d))
    panels = (("input", None), ("label", label), (f"prediction (volume Dice: {scores})", pred))
    for ax, (name, overlay) in zip(axes, panels, strict=True):
        ax.imshow(image.T, cmap="gray", vmin=lo, vmax=hi, origin="lower")  # NIfTI (x, y) -> rows y, columns x
        if overlay is not None:
            ax.imshow(np.ma.masked_equal(overlay.T, 0), cmap=cmap, vmin=0, vmax=num_classes - 1, alpha=0.5,
                      origin="lower", interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    handles = [Patch(color=CLASS_COLOURS[k - 1], label=names[k]) for k in range(1, num_classes)]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=9, frameon=False)
    fig.suptitle(title or where, fontsize=10)
    return save_figure(fig, out_png)


def run_bundle(config: str, overrides: Mapping[str, object]) -> None:
    """``python -m monai.bundle run --config_file <config> --key value ...`` from the repository root."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(CONFIGS / config)]
    for key, value in overrides.items():
        cmd += [f"--{key}", str(value)]
    print("+ " + " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def validation_case(run_dir: Path) -> dict[str, str]:
    """The first validation case of a ``train.yaml`` run on its generated volumes: the split is recomputed by
    the bundle's own parser (``datalists``, seeded), on the run's existing phantom folder so nothing is written."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.yaml"))
    parser.update({"output_dir": str(run_dir), "data": str(_phantom_dir(run_dir))})
    return dict(parser.get_parsed_content("datalists")["val"][0])


def _phantom_dir(run_dir: Path) -> Path:
    """Where ``train.yaml`` (``default_data: volumes``) writes its generated volumes in ``run_dir``."""
    return run_dir / "default_data" / "volumes"


def train(run_dir: Path, epochs: int) -> None:
    """Run ``train.yaml`` into a temporary sibling of ``run_dir`` and rename it over ``run_dir``."""
    from lvmmed_monai.io import build_folder

    build_folder(run_dir, lambda tmp: run_bundle("train.yaml", {"output_dir": tmp, "max_epochs": epochs,
                                                                "progress_bar": "false"}))


def make_overlay(run_dir: Path, out_png: Path) -> Path:
    """Segment the first validation volume of the run with ``inference.yaml`` and plot it with its label."""
    import nibabel as nib

    from lvmmed_monai.demo.volumes import SEGMENTATION_CLASSES

    case = validation_case(run_dir)
    pred_dir = run_dir / "figure_predictions"
    run_bundle("inference.yaml", {"train_dir": run_dir, "data": case["image"], "output_dir": pred_dir})
    name = Path(case["image"]).name.split(".")[0]
    image, label, pred = (np.asarray(nib.load(p).dataobj) for p in
                          (case["image"], case["label"], pred_dir / f"{name}_seg.nii.gz"))
    return plot_overlay(image, label.astype(np.int64), pred.astype(np.int64), out_png,
                        class_names=SEGMENTATION_CLASSES,
                        title=f"lvmmed_seg, validation volume {name} (best checkpoint of the run)")


def main(argv: list[str] | None = None) -> int:
    """Command line: train (or read ``--logdir``), then write the two PNGs to ``--out``."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/figures", help="folder of the PNGs (default: docs/figures)")
    ap.add_argument("--run_dir", default="outputs/figures_lvmmed_seg",
                    help="output folder of the bundle run made here (replaced)")
    ap.add_argument("--epochs", type=int, default=20, help="max_epochs of the run (train.yaml's default: 20)")
    ap.add_argument("--logdir", help="plot this existing run's TensorBoard folder instead of training")
    args = ap.parse_args(argv)
    out = Path(args.out)
    start = time.perf_counter()
    if args.logdir:
        logdir = Path(args.logdir)
        run_dir = logdir.parent
    else:
        run_dir = Path(args.run_dir)
        train(run_dir, args.epochs)
        logdir = run_dir / "logs"
    curve = plot_training_curve(
        logdir, out / "training_curve.png",
        title="lvmmed_seg train.yaml on generated phantoms, random initialisation (a smoke run, not a result)"
        if not args.logdir else f"run: {logdir}")
    print(f"wrote {curve}")
    if (run_dir / "models" / "model_best.pt").is_file() and (_phantom_dir(run_dir) / "images").is_dir():
        print(f"wrote {make_overlay(run_dir, out / 'overlay.png')}")
    else:
        print(f"overlay skipped: {run_dir} holds no models/model_best.pt and default_data/volumes of train.yaml")
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
