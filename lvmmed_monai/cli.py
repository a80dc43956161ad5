"""The ``lvmmed`` command: weights (list, inspect, convert, fetch), demo, vista2d-demo, mr-data, prepare-data,
nunet-path, info."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from lvmmed_monai import weights as W

__all__ = ["main", "inspect_weights", "run_demo"]


def inspect_weights(path: str, prefix: str | None = None) -> str:
    """Describe a checkpoint: layout, tensor and parameter counts, and whether each encoder takes it."""
    from lvmmed_monai.encoders import ENCODERS

    state, extra = W.read_checkpoint(path)
    stripped, ignored = W.strip_prefixes(state, [prefix] if prefix else [])
    layout = W.detect_layout(stripped)
    n_params = sum(v.numel() for k, v in stripped.items() if v.is_floating_point() and "running_" not in k)
    lines = [
        f"file: {path}",
        f"detected layout: {layout or 'unknown'}" + (f" ({W.LAYOUTS[layout]})" if layout else ""),
        f"tensors: {len(stripped)}" + (f" (+{len(ignored)} outside the encoder, ignored)" if ignored else ""),
        f"parameters: {n_params:,}",
    ]
    if extra:
        lines.append(f"container entries besides the weights: {sorted(extra)}")
    for name, cls in ENCODERS.items():
        model = cls()
        try:
            report = W.load_weights(model, stripped, strict=True)
            notes = f" ({'; '.join(report.notes)})" if report.notes else ""
            lines.append(f"loads into {name}: yes{notes}")
        except W.CheckpointMismatchError as err:
            r = err.report
            lines.append(
                f"loads into {name}: no ({len(r.missing)} missing, {len(r.unexpected)} unexpected, "
                f"{len(r.shape_mismatches)} shape mismatches)"
            )
    return "\n".join(lines)


def run_demo(out_dir: str = "outputs/demo", steps: int = 30, seed: int = 0) -> dict[str, float]:
    """Generate official-layout checkpoints, load both encoders strictly and run them in MONAI networks.

    The ResNet-50 U-Net (MONAI FlexibleUNet, 1-channel input) is fine-tuned for ``steps`` steps on
    generated phantoms; Dice before and after is returned. The ViT-B checkpoint (SAM layout, 1024 grid)
    is loaded at 128 x 128 into the UNETR-style network, and the classifier and Faster R-CNN run once.
    """
    from monai.losses import DiceCELoss
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    from lvmmed_monai.data import official_resnet50_state, official_vit_b_state, phantom_batch
    from lvmmed_monai.networks import LVMMedClassifier, LVMMedFlexibleUNet, LVMMedViTUNETR, lvmmed_faster_rcnn

    torch.manual_seed(seed)
    out = Path(out_dir)
    r50_path = W.save_atomic(official_resnet50_state(seed), out / "lvmmed_resnet.torch")
    vit_path = W.save_atomic(official_vit_b_state(seed), out / "lvmmed_vit.pth")
    print(f"[demo] generated checkpoints in the official layouts under {out}/ (random weights)")
    for path in (r50_path, vit_path):
        print(inspect_weights(str(path)))

    images, labels = phantom_batch(24, size=64, channels=1, num_classes=3, seed=seed)
    net = LVMMedFlexibleUNet(in_channels=1, out_channels=3, weights=r50_path)
    print("[demo] ResNet-50 U-Net encoder load report:\n" + net.encoder.load_report.summary())
    loss_fn, dice = DiceCELoss(to_onehot_y=True, softmax=True), DiceMetric(include_background=False)

    def score() -> float:
        net.eval()
        with torch.no_grad():
            pred = net(images[16:]).argmax(1, keepdim=True)
        dice.reset()
        dice(one_hot(pred, 3), one_hot(labels[16:], 3))
        return float(dice.aggregate())

    before = score()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    start = time.perf_counter()
    for step in range(steps):
        net.train()
        idx = torch.randperm(16)[:8]
        loss = loss_fn(net(images[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        if step % 10 == 0 or step == steps - 1:
            print(f"[demo] U-Net step {step + 1}/{steps} DiceCE loss {loss.item():.4f}")
    after = score()
    print(f"[demo] held-out Dice (organ, lesion mean) before {before:.3f} -> after {after:.3f} "
          f"({steps} steps, {time.perf_counter() - start:.1f} s)")

    vit_net = LVMMedViTUNETR(in_channels=1, out_channels=3, img_size=128, weights=vit_path)
    print("[demo] ViT-B UNETR encoder load report:\n" + vit_net.encoder.load_report.summary())
    with torch.no_grad():
        seg = vit_net.eval()(torch.nn.functional.interpolate(images[:2], size=128))
    print(f"[demo] ViT-B UNETR output {tuple(seg.shape)}")
    probe = LVMMedClassifier(num_classes=2, weights=r50_path, in_channels=1, freeze_encoder=True).eval()
    with torch.no_grad():
        logits = probe(images[:4])
    print(f"[demo] linear-probe classifier logits {tuple(logits.shape)}")
    det = lvmmed_faster_rcnn(num_classes=3, weights=r50_path, min_size=64, max_size=64).eval()
    with torch.no_grad():
        dets = det([images[0].expand(3, -1, -1)])
    print(f"[demo] Faster R-CNN (LVM-Med R50-FPN) returned {len(dets[0]['boxes'])} boxes")
    return {"dice_before": before, "dice_after": after}


def _cmd_list(_: argparse.Namespace) -> int:
    for info in W.OFFICIAL_WEIGHTS.values():
        print(f"{info.name}: file {info.filename}, layout {info.layout}, encoder {info.encoder}")
        for src in info.sources:
            print(f"  where: {src}")
    print(f"licence: {W.LICENCE_NOTE}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    print(inspect_weights(args.file, prefix=args.prefix))
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    state, _ = W.read_checkpoint(args.src)
    state, _ = W.strip_prefixes(state, [args.prefix] if args.prefix else [])
    W.save_atomic(W.convert_state_dict(state, args.to), args.dst)
    print(f"wrote {args.dst} in layout {args.to}")
    return 0


def _cmd_fetch(args: argparse.Namespace) -> int:
    print(W.LICENCE_NOTE)
    print(W.resolve_weights(args.source, sha256=args.sha256, cache_dir=args.cache_dir,
                              timeout=args.timeout))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    run_demo(args.out, steps=args.steps, seed=args.seed)
    return 0


def _cmd_vista2d_demo(args: argparse.Namespace) -> int:
    from lvmmed_monai.engines.cells import VISTA2D_REPORT, run_vista2d_demo

    try:
        run_vista2d_demo(args.out, steps=args.steps, size=args.size, seed=args.seed, weights=args.weights)
    except ImportError as err:  # segment-anything missing: the message says what to install
        print(f"lvmmed: error: {err}", file=sys.stderr)
        return 2
    print(f"[vista2d] report: {Path(args.out) / VISTA2D_REPORT}")
    return 0


def _cmd_mr_data(args: argparse.Namespace) -> int:
    from lvmmed_monai.data.atlas import prepare_mr_data

    paths = prepare_mr_data(args.out, args.templates, seed=args.seed)
    counts = json.loads((Path(args.out) / "manifest.json").read_text())["counts"]
    print(f"{paths['unlabelled']}: {counts['unlabelled']} unlabelled MR slices (pretraining data)")
    print(f"{paths['regions']}: {counts['region_train']} train / {counts['region_test']} test patches of "
          f"{len(counts['lobes'])} lobes from disjoint slices (probe_data)")
    return 0


def _part(text: str) -> tuple[int, int]:
    try:
        r, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--part takes R/N (part R of N, from 0), got {text!r}") from None
    if not 0 <= r < n:
        raise argparse.ArgumentTypeError(f"--part R/N needs 0 <= R < N, got {text!r}")
    return r, n


def _cmd_prepare_data(args: argparse.Namespace) -> int:
    import logging

    from lvmmed_monai.data.pretrain import prepare_part, prepare_slices

    logging.basicConfig(level=logging.INFO, format="%(message)s")  # skipped files and the summary line
    data = json.loads(Path(args.data).read_text()) if args.data.endswith(".json") else args.data
    options = {"axis": args.slice_axis, "percentiles": args.intensity_percentiles,
               "min_slice_range": args.min_slice_range, "on_error": args.on_bad_data,
               "max_size": args.max_slice_size or None, "workers": args.workers, "progress": args.progress}
    start = time.perf_counter()
    if args.part:
        decoded = prepare_part(data, args.cache_dir, part=args.part, **options)
        print(f"part {args.part[0]}/{args.part[1]}: {decoded} file(s) decoded into {args.cache_dir} in "
              f"{time.perf_counter() - start:.1f} s; run without --part once every part is done to merge the index")
        return 0
    index = prepare_slices(data, args.cache_dir, **options)
    print(f"{len(index)} slices in {args.cache_dir} ({len(index.shards)} shard(s)) in {time.perf_counter() - start:.1f}"
          f" s; index {index.nbytes / len(index):.1f} bytes per slice; the bundle reuses it with --cache_dir "
          f"{args.cache_dir} and the same slicing settings")
    return 0


def _cmd_nnunet_path(_: argparse.Namespace) -> int:
    """The folder of the nnU-Net trainers, through package resources: the library never imports the plugin
    (which imports nnU-Net and the library)."""
    from importlib.resources import files

    print(Path(str(files("nnunet_plugin"))).resolve())
    return 0


def _cmd_info(_: argparse.Namespace) -> int:
    import monai

    import lvmmed_monai

    print(f"lvmmed-monai {lvmmed_monai.__version__}, torch {torch.__version__}, monai {monai.__version__}, "
          f"cuda available: {torch.cuda.is_available()}")
    print(f"encoders: {sorted(lvmmed_monai.ENCODERS)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lvmmed", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    wp = sub.add_parser("weights", help="LVM-Med checkpoints").add_subparsers(dest="weights_command", required=True)
    wp.add_parser("list", help="the released files, their layouts and where to get them").set_defaults(func=_cmd_list)
    p = wp.add_parser("inspect", help="detected layout, counts, and which encoder loads it")
    p.add_argument("file")
    p.add_argument("--prefix", help="an extra key prefix to strip")
    p.set_defaults(func=_cmd_inspect)
    p = wp.add_parser("convert", help="convert between layouts (e.g. sam_vit_b <-> timm_samvit_b)")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--to", required=True, choices=W.CONVERTIBLE_LAYOUTS)
    p.add_argument("--prefix")
    p.set_defaults(func=_cmd_convert)
    p = wp.add_parser("fetch", help="download an explicit URL or hf://repo/file (atomic, optional sha256)")
    p.add_argument("source")
    p.add_argument("--sha256")
    p.add_argument("--cache-dir")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds to wait for the server (connecting, then each read) before giving up")
    p.set_defaults(func=_cmd_fetch)
    p = sub.add_parser("demo", help="load both encoders from generated official-layout files and run them")
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)
    p = sub.add_parser("vista2d-demo", help="fine-tune MONAI's CellSamWrapper (VISTA-2D) with LVM-Med ViT-B weights "
                       "on generated cells; held-out foreground Dice before and after")
    p.add_argument("--out", default="outputs/vista2d")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=256, help="image and network size in pixels (a multiple of 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", help="LVM-Med ViT-B checkpoint (lvmmed_vit.pth, any ViT-B layout); default: a "
                   "generated one with random weights")
    p.set_defaults(func=_cmd_vista2d_demo)
    p = sub.add_parser("mr-data", help="real MR pretraining slices and a lobe probe set from Debian's mricron-data")
    p.add_argument("--out", default="outputs/mr_data")
    p.add_argument("--templates", default="/usr/share/mricron/templates")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_mr_data)
    p = sub.add_parser("prepare-data", help="slice, normalise and cache a pretraining collection in parallel (the "
                       "lvmmed_pretrain bundle's data step; resumable, a rerun only stats the files)")
    p.add_argument("data", help="folder (its sub-folders are the datasets) or a .json list of files")
    p.add_argument("--cache-dir", required=True, help="the bundle's cache_dir (default there: output_dir/slice_cache)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: this machine's cores)")
    p.add_argument("--part", type=_part, help="R/N: prepare only part R of N (files R, R+N, ...), e.g. one per "
                   "machine; then run once without --part to merge")
    p.add_argument("--slice-axis", type=int, default=2)
    p.add_argument("--intensity-percentiles", type=float, nargs=2, default=[0.5, 99.5])
    p.add_argument("--min-slice-range", type=float, default=0.05)
    p.add_argument("--max-slice-size", type=int, default=512, help="0 keeps the native size")
    p.add_argument("--on-bad-data", choices=["skip", "raise"], default="skip")
    p.add_argument("--progress", default="auto", help="progress bar: auto (on a terminal), true or false")
    p.set_defaults(func=_cmd_prepare_data)
    sub.add_parser("info", help="versions and registered encoders").set_defaults(func=_cmd_info)
    sub.add_parser(
        "nnunet-path", help="folder of the nnU-Net trainers: export nnUNet_extTrainer=$(lvmmed nnunet-path)"
    ).set_defaults(func=_cmd_nnunet_path)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (W.CheckpointError, OSError, ValueError) as err:  # OSError: missing file, folder, download
        print(f"lvmmed: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
