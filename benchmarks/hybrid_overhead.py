"""Cost of inter-slice context: the hybrid 3D segmentation network vs its own 2D network slice by slice.

Both run forward + backward (train mode, loss = mean squared logits) on the same ``(1, 1, D, H, W)`` volume
(default 32 x 128 x 128): the hybrid network (LVM-Med ResNet-50 per slice + deformable-attention f_inter +
context, default sizes, all ``D`` slices in one chunk) and its ``net2d`` (the same FlexibleUNet and
weights) on the ``D`` slices as one batch of 2D images, the fair slice-by-slice baseline (a Python loop
over single slices would only make the baseline slower). The two steps alternate within each repeat,
the order switching every repeat, so that load from other processes hits both alike. Reported: the
minimum of each (the run least disturbed by other processes; the last line is their ratio), the median
of the per-repeat ratios, the process CPU time, and f_inter + context maps timed alone (what the hybrid
adds). Peak memory: each step runs again in a fresh child process, which reports the peak of its resident
set size during one step (after a warm-up step) minus its size before it, sampled every ms, with glibc
returning freed tensors to the system (CPU tensors are invisible to ``tracemalloc``); on CUDA,
``torch.cuda.max_memory_allocated`` in this process.

    python benchmarks/hybrid_overhead.py [--depth 32] [--size 128] [--repeats 5] [--threads N] [--device cpu]

The last line printed is ``ratio hybrid/2D forward+backward time: R`` (goal <= 1.15).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import torch

from lvmmed_monai.networks import LVMMedHybridSegNet


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(device: torch.device) -> LVMMedHybridSegNet:
    torch.manual_seed(0)
    net = LVMMedHybridSegNet(in_channels=1, out_channels=3, slice_chunk=None).to(device).train()
    with torch.no_grad():  # non-zero context maps: the measured network really uses f_inter
        for proj in net.context:
            proj.weight.normal_(0, 0.01)
    return net


def steps(net: LVMMedHybridSegNet, volume: torch.Tensor) -> dict[str, Callable[[], None]]:
    slices = volume[0].transpose(0, 1)  # (D, C, H, W): the volume's slices as a 2D batch

    def hybrid() -> None:
        net.zero_grad(set_to_none=True)
        net(volume).square().mean().backward()

    def slice_by_slice() -> None:
        net.zero_grad(set_to_none=True)
        net.net2d(slices).square().mean().backward()

    return {"hybrid": hybrid, "2D": slice_by_slice}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def child_peak(which: str, args: argparse.Namespace) -> None:
    """In a fresh process: a warm-up step, then the peak RSS growth over one step, sampled every ms by a thread
    (torch ops release the GIL). The parent sets glibc's mmap threshold low, so freed tensors leave the RSS
    and it follows live memory."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    net = build(device)
    volume = torch.rand(1, 1, args.depth, args.size, args.size, device=device)
    step = steps(net, volume)[which]
    step()
    net.zero_grad(set_to_none=True)
    before, peak, done = _rss_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    step()
    done.set()
    sampler.join()
    print(json.dumps({"peak_bytes": max(peak[0], _rss_bytes()) - before}))


def peak_memory(which: str, args: argparse.Namespace, device: torch.device) -> float:
    if device.type == "cuda":
        net = build(device)
        step = steps(net, torch.rand(1, 1, args.depth, args.size, args.size, device=device))[which]
        step()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    cmd = [sys.executable, __file__, "--child", which, "--depth", str(args.depth), "--size", str(args.size),
           "--device", args.device, "--threads", str(args.threads)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run(cmd, capture_output=True,
        encoding="utf-8", errors="replace", check=True, env=env).stdout.strip().splitlines()[-1]
    return json.loads(out)["peak_bytes"] / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=32)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--child", choices=["hybrid", "2D"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_peak(args.child, args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    net = build(device)
    volume = torch.rand(1, 1, args.depth, args.size, args.size, device=device)
    fns = steps(net, volume)
    inter = sum(p.numel() for p in net.inter.parameters()) + sum(p.numel() for p in net.context.parameters())
    print(f"device {device}, threads {torch.get_num_threads()}, volume 1x1x{args.depth}x{args.size}x{args.size}; "
          f"parameters: 2D {sum(p.numel() for p in net.net2d.parameters()) / 1e6:.1f}M, "
          f"f_inter + context {inter / 1e6:.1f}M")
    times: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(args.warmup + args.repeats):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            _sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            fns[name]()
            _sync(device)
            if r >= args.warmup:
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    best = {k: min(v) for k, v in times.items()}
    paired = [h / b for h, b in zip(times["hybrid"], times["2D"], strict=True)]
    for name in fns:
        print(f"{name:>7}: forward+backward min {best[name]:.3f} s, median {statistics.median(times[name]):.3f} s "
              f"(runs: {', '.join(f'{t:.3f}' for t in times[name])}), "
              f"peak memory {peak_memory(name, args, device):.0f} MiB")
    extra = inter_only(net, args.depth, device, args.repeats)
    print(f"f_inter + context alone (forward+backward on the {args.depth} slice embeddings): min {extra:.3f} s")
    print(f"per-repeat ratios hybrid/2D: {', '.join(f'{r:.3f}' for r in paired)} "
          f"(median {statistics.median(paired):.3f})")
    print(f"process CPU time, min: hybrid {min(cpu['hybrid']):.3f} s, 2D {min(cpu['2D']):.3f} s, "
          f"ratio {min(cpu['hybrid']) / min(cpu['2D']):.3f}")
    print(f"ratio hybrid/2D forward+backward time: {best['hybrid'] / best['2D']:.3f}")


def inter_only(net: LVMMedHybridSegNet, depth: int, device: torch.device, repeats: int) -> float:
    """What the hybrid adds to the 2D step, timed alone: f_inter and the context maps, forward + backward."""
    y = torch.randn(1, depth, net.embed_dim, device=device)
    runs = []
    for _ in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        outs = net.inter(y)
        sum(proj(o).square().mean() for proj, o in zip(net.context, outs, strict=True)).backward()
        _sync(device)
        runs.append(time.perf_counter() - start)
    return min(runs[1:])

if __name__ == "__main__":
    main()
