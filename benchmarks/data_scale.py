"""Pretraining data preparation at scale: images/s with 1 and 2 processes, the rerun cost, index and memory.

LVM-Med pretrains on 1.3M slices from 55 datasets. This generates ``--n`` small PNG images (256 x 256 grey, in
``--datasets`` sub-folders; decoding and normalising one is what preparation spends its time on) and measures
:func:`lvmmed_monai.data.pretrain.prepare_slices`, each run in a fresh process (its peak RSS its own):

* 1 process (``workers=1``) and ``--workers`` processes, each into an empty cache: images/s, peak RSS of the
  main process and of the largest worker;
* a rerun on the prepared cache (same files and settings: stats only, no decoding): ms per image;
* the index: bytes per slice (its numpy arrays, the paths included), and the RSS growth of a rerun (the file list
  and keys it builds, the index it returns; measured with the index held) per 1,000 slices for N/4, N/2 and N
  images: flat when memory grows linearly with the collection;
* the projected time for 1.3M images on 16 cores: the 1-process rate x 16 x the measured parallel efficiency
  (at most 1).

    python benchmarks/data_scale.py [--n 3000] [--workers 2] [--size 256] [--datasets 5] [--out DIR]

Goals: speed-up >= 1.8 with 2 processes on 2 cores, rerun <= 0.2 ms per image, RSS growth per 1,000 slices flat
in N. The last line printed is ``speed-up 2 processes vs 1: R``.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PAPER_IMAGES = 1_300_000


def generate(root: Path, n: int, size: int, datasets: int, seed: int = 0) -> None:
    """``n`` PNGs (smooth shapes, a gradient and noise, like a radiograph's texture) in ``datasets`` sub-folders."""
    from PIL import Image

    if (root / "done.json").is_file() and json.loads((root / "done.json").read_text()) == [n, size, datasets]:
        return
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    for i in range(n):
        folder = root / f"dataset_{i % datasets:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        cy, cx, r = rng.uniform(0.2, 0.8, 3)
        img = 0.4 * yy + 0.5 * (((yy - cy) ** 2 + (xx - cx) ** 2) < (0.3 * r) ** 2) + rng.normal(0, 0.05, yy.shape)
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(folder / f"img_{i:07d}.png")
    (root / "done.json").write_text(json.dumps([n, size, datasets]))


def _rss_now() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def child(data: str | list, cache: str, workers: int) -> None:
    """One measured preparation in this fresh process; prints a JSON line."""
    import torch

    from lvmmed_monai.data.pretrain import prepare_slices

    torch.set_num_threads(1)
    if data.endswith(".json"):
        data = json.loads(Path(data).read_text())
    before = _rss_now()
    start = time.perf_counter()
    index = prepare_slices(data, cache, workers=workers, progress=False)
    seconds = time.perf_counter() - start
    after = _rss_now()  # the index held, the file list and keys freed
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    workers_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "slices": len(index), "index_bytes": index.nbytes,
                      "rss_before": before, "rss_after": after, "peak_rss": own, "worker_peak_rss": workers_peak}))


def run(data: Path, cache: Path, workers: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", str(data), str(cache), str(workers)],
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mib(b: float) -> str:
    return f"{b / 2**20:.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--datasets", type=int, default=5)
    parser.add_argument("--out", help="folder for the images and caches (default: a temporary one, deleted)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="data_scale_"))
    try:
        start = time.perf_counter()
        generate(out / "images", args.n, args.size, args.datasets)
        print(f"{args.n} PNG images of {args.size} x {args.size} in {args.datasets} datasets "
              f"({time.perf_counter() - start:.1f} s to generate)")
        for name in ("cache_1", f"cache_{args.workers}"):
            shutil.rmtree(out / name, ignore_errors=True)
        one = run(out / "images", out / "cache_1", 1)
        many = run(out / "images", out / f"cache_{args.workers}", args.workers)
        rerun = run(out / "images", out / f"cache_{args.workers}", args.workers)
        rate1, rate2 = args.n / one["seconds"], args.n / many["seconds"]
        speedup = one["seconds"] / many["seconds"]
        print(f"1 process:   {one['seconds']:.2f} s, {rate1:.0f} images/s, peak RSS {_mib(one['peak_rss'])}")
        print(f"{args.workers} processes: {many['seconds']:.2f} s, {rate2:.0f} images/s, peak RSS "
              f"{_mib(many['peak_rss'])} (main) and {_mib(many['worker_peak_rss'])} (largest worker, shared pages "
              "of the parent included)")
        print(f"rerun (stats only): {rerun['seconds']:.3f} s, {1000 * rerun['seconds'] / args.n:.3f} ms per image")
        print(f"index: {one['slices']} slices, {one['index_bytes']} bytes, {one['index_bytes'] / one['slices']:.1f} "
              "bytes per slice (8 per slice, 30 + the path per file)")
        growth = []
        images = sorted((out / "images").rglob("*.png"))
        for n in (args.n // 4, args.n // 2, args.n):  # lists of the first n files: their slices are in the cache
            listing = out / f"list_{n}.json"
            listing.write_text(json.dumps([str(f) for f in images[:n]]))
            run(listing, out / f"cache_{args.workers}", args.workers)  # merges this list's index (no decoding)
            r = run(listing, out / f"cache_{args.workers}", args.workers)
            growth.append((n, (r["rss_after"] - r["rss_before"]) / r["slices"] * 1000))
        print("RSS growth of a rerun per 1,000 slices (index held, after - before): "
              + ", ".join(f"{g / 1024:.0f} KiB (N = {n})" for n, g in growth))
        efficiency = min(1.0, speedup / args.workers)  # above 1 is noise: no more than linear
        projected = PAPER_IMAGES / (rate1 * 16 * efficiency)
        print(f"projected for {PAPER_IMAGES:,} images on 16 cores (1-process rate x 16 x parallel efficiency "
              f"{efficiency:.2f}): {projected / 60:.1f} min")
        print(f"speed-up {args.workers} processes vs 1: {speedup:.2f}")
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
