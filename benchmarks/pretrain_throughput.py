"""Images/s of the lvmmed_pretrain bundle's training loop vs a bare GM-SSL loop on the same settings.

* bundle: ``bundles/lvmmed_pretrain/configs/train.yaml`` through MONAI's ``ConfigWorkflow`` on the built-in
  collection (file-backed slice cache, CacheDataset, seeded LVM-Med views in the DataLoader, the engine with
  its handlers: stats, TensorBoard, lr schedule, checkpoints, gradient clipping, stats all-reduce);
* bare: ``encoder.feature_map`` -> ``LVMMedLoss`` -> gradient clipping -> Adam step on a batch made once
  beforehand (views of the same images, same model, optimizer, clipping and sizes): the method alone.

The two loops are interleaved: after each bundle iteration one bare step runs (timed apart and left out
of the bundle's cycle), so that load from other processes hits both alike. On CPU the bundle's DataLoader
runs in the main process (0 workers; a worker would prepare batches during the bare steps for free), so
its data cost is counted in full. The bundle's own split (time in its step vs. waiting for data and in
handlers) is printed as well. Timed: iterations after ``--warmup`` ones; start-up, the slice cache and
the final export are not counted.

    python benchmarks/pretrain_throughput.py [--iterations 8] [--warmup 2] [--image-size 64] [--batch 32]
        [--encoder lvmmed_resnet50] [--device cpu|cuda] [--num-workers N]

The last line printed is ``ratio bundle/bare images per second: R``; the goal is R >= 0.9.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow

TRAIN = Path(__file__).resolve().parents[1] / "bundles" / "lvmmed_pretrain" / "configs" / "train.yaml"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_bare_step(args: argparse.Namespace, out: Path) -> Callable[[int], float]:
    """The method alone: one prepared batch -> encoder -> LVMMedLoss -> Adam, same model and sizes; returns
    a function running one timed step."""
    from monai.data import set_track_meta

    from lvmmed_monai.data.pipeline import pretrain_dataset, pretrain_index
    from lvmmed_monai.engines import LVMMedPretrainModel, build_encoder
    from lvmmed_monai.ssl import LVMMedLoss

    device = torch.device(args.device)
    set_track_meta(False)
    ds = pretrain_dataset(pretrain_index(None, out), image_size=args.image_size, encoder_name=args.encoder)
    items = [ds[(i % len(ds), i)] for i in range(args.batch)]
    batch = {k: torch.stack([it[k] for it in items]).to(device) for k in items[0]}
    torch.manual_seed(0)
    encoder = build_encoder(args.encoder, args.image_size)
    model = LVMMedPretrainModel(encoder, LVMMedLoss(in_dim=encoder.feature_dim), world_size=1).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    gen = torch.Generator(device=device)
    use_amp = args.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    def step(it: int) -> float:
        _sync(device)
        start = time.perf_counter()
        gen.manual_seed(it)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            loss, _ = model(**batch, generator=gen)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad_norm)
        scaler.step(opt)
        scaler.update()
        _sync(device)
        return time.perf_counter() - start

    return step


def run_interleaved(args: argparse.Namespace, out: Path) -> dict:
    """Run the bundle; after each of its iterations run one bare step (timed apart and subtracted from the
    bundle's cycle), so both loops see the same load from other processes."""
    bare_step = make_bare_step(args, out)
    iters = args.warmup + args.iterations
    workflow = ConfigWorkflow(
        config_file=str(TRAIN), workflow_type=None, logging_file=False, output_dir=str(out / "bundle"),
        encoder_name=args.encoder, image_size=args.image_size, batch_size=args.batch, max_epochs=1,
        samples_per_epoch=args.batch * iters, ckpt_interval=10**6, progress_bar=False, device=args.device,
        amp=args.amp, num_workers=args.num_workers, clip_grad_norm=args.clip_grad_norm,
        first_order_warmup=0, noise_scale=1.0, views={},  # the bare loop's objective and views (paper settings)
    )
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    cycles: list[float] = []
    bare: list[float] = []
    steps: list[float] = []
    clock = {"last": None}

    def interleave(engine) -> None:
        _sync(engine.state.device)
        now = time.perf_counter()
        if clock["last"] is not None:
            cycles.append(now - clock["last"])
        steps.append(float(engine.state.output["step_s"]))
        bare.append(bare_step(engine.state.iteration))
        clock["last"] = time.perf_counter()  # the bundle's next cycle starts after the bare step

    trainer.add_event_handler(Events.ITERATION_COMPLETED, interleave)
    workflow.run()
    first = max(args.warmup, 1)  # cycles[i] is iteration i + 2's
    timed_cycles, timed_bare, timed_steps = cycles[first - 1:], bare[first:], steps[first:]
    return {
        "bundle": args.batch / statistics.mean(timed_cycles),
        "bare": args.batch / statistics.mean(timed_bare),
        "step_share": sum(timed_steps) / sum(timed_cycles),
        "last": {k: float(v) for k, v in trainer.state.output.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--encoder", default="lvmmed_resnet50")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-workers", type=int, default=None, help="bundle DataLoader workers (default: 0 on "
                        "CPU, so that no worker prepares data during the interleaved bare steps; 8 on GPU)")
    parser.add_argument("--no-amp", dest="amp", action="store_false")
    parser.add_argument("--clip-grad-norm", type=float, default=3.0, help="both loops (the bundle's default)")
    args = parser.parse_args()
    if args.num_workers is None:
        args.num_workers = 8 if args.device.startswith("cuda") else 0
    with tempfile.TemporaryDirectory() as tmp:
        r = run_interleaved(args, Path(tmp))
    bundle, bare, step_share, last = r["bundle"], r["bare"], r["step_share"], r["last"]
    print(f"device {args.device}, encoder {args.encoder}, batch {args.batch}, image {args.image_size} px, "
          f"threads {torch.get_num_threads()}, bundle DataLoader workers {args.num_workers}, "
          f"{args.iterations} timed iterations after {args.warmup}")
    print("bundle's last iteration: " + ", ".join(f"{k} {v:.3f}" for k, v in last.items()))
    print(f"bare loop (prepared batches): {bare:.2f} images/s")
    print(f"bundle loop (data + engine + handlers): {bundle:.2f} images/s; {100 * step_share:.1f}% of its time in "
          f"the step itself, {100 * (1 - step_share):.1f}% waiting for data or in handlers (same iterations)")
    print(f"ratio bundle/bare images per second: {bundle / bare:.3f}")


if __name__ == "__main__":
    main()
