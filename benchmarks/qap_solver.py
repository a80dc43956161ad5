"""Benchmark the batched QAP solver on LVM-Med-like 16-node instances, side by side with pygmtools.

Instances are the real ones: the library's views, a ResNet-50 and ``LVMMedLoss.affinities`` with the
Gumbel noise of IMLE's forward pass (see :func:`lvmmed_like_affinities`), in three regimes:

* ``paper``: LVMMedViewsd's default views, Gumbel scale 1 (the paper's noise): noise-dominated problems;
* ``strong-views``: stronger view noise (small crops, strong intensity jitter, blur and noise on every view),
  Gumbel scale 1: the two views' features agree even less;
* ``bundle``: the default views with train.yaml's Gumbel scale 0.03: structure-dominated problems.

Every method is scored against the **best-known** objective of each problem: the best found by any method
in the run, including a long reference search (robust tabu search, 8 starts x 1000 swaps per problem, about
100x our default's time), which no method can beat by construction of the score. Prints, per regime and
method, the mean and min objective / best-known, the share of problems solved to the best-known, and
problems/s. The last line: ours (default settings) against rrwm, throughput and objective.

    python benchmarks/qap_solver.py --num-instances 200 --device cpu --seed 0
"""

from __future__ import annotations

import argparse
import time
from typing import NamedTuple

import torch
import torchvision

from lvmmed_monai.data.views import LVMMedViewsd
from lvmmed_monai.demo.synthetic import phantom_batch
from lvmmed_monai.ssl.imle import gumbel_noise
from lvmmed_monai.ssl.loss import LVMMedLoss
from lvmmed_monai.ssl.matching import lawler_from_edges, qap_objective, solve_qap

STRONG_VIEWS = {"crop_scale": (0.08, 0.5), "brightness": 0.8, "contrast": 0.8, "jitter_prob": 1.0,
                "blur_prob": 1.0, "noise_prob": 1.0, "noise_std": 0.1}
# regime -> (view arguments, Gumbel scale); regimes with the same views share the network pass
REGIMES = {"paper": ({}, 1.0), "strong-views": (STRONG_VIEWS, 1.0), "bundle": ({}, 0.03)}
# method label -> (solve_qap method, options); "lvmmed" (our default) must stay first of ours
METHODS = {
    "lvmmed": ("lvmmed", {}),
    "lvmmed+tabu25": ("lvmmed", {"tabu_iters": 25}),
    "lvmmed+tabu100x4": ("lvmmed", {"tabu_iters": 100, "tabu_searches": 4}),
    "lvmmed 64 starts": ("lvmmed", {"num_random_starts": 64, "seed": 1}),
    "rrwm": ("rrwm", {}),
    "ipfp": ("ipfp", {}),
    "lap": ("lap", {}),
}
REFERENCE = ("lvmmed", {"num_random_starts": 8, "tabu_iters": 1000, "tabu_searches": 9, "seed": 2})


class Affinities(NamedTuple):
    c_v: torch.Tensor
    c_e: torch.Tensor
    edges_s: torch.Tensor
    edges_t: torch.Tensor


@torch.no_grad()
def lvmmed_like_affinities(num: int, n: int = 16, k: int = 5, size: int = 64, seed: int = 0,
                           views: dict | None = None) -> Affinities:
    """Noise-free affinities of the ``num`` problems LVMMedLoss hands to the solver in a training step.

    ``num * n`` phantoms (:func:`~lvmmed_monai.demo.synthetic.phantom_batch`) -> two ``LVMMedViewsd(**views)``
    views with coordinate maps -> torchvision ResNet-50 trunk (``weights=None``) -> ``LVMMedLoss.affinities``
    (projector, kNN k=5, GCN, global + local vertex affinity, edge affinity; randomly initialised heads).
    """
    torch.manual_seed(seed)
    images, _ = phantom_batch(num * n, size=size + 16, seed=seed)
    transform = LVMMedViewsd("image", size=size, out_channels=3, **(views or {})).set_random_state(seed)
    items = [transform({"image": im}) for im in images]
    x_s, x_t, c_s, c_t = (torch.stack([it[key] for it in items]) for key in ("image_s", "image_t", "coords_s",
                                                                             "coords_t"))
    trunk = torch.nn.Sequential(*list(torchvision.models.resnet50(weights=None).children())[:-2]).eval()
    feats_s = torch.cat([trunk(x) for x in x_s.split(256)])
    feats_t = torch.cat([trunk(x) for x in x_t.split(256)])
    aff = LVMMedLoss(in_dim=2048, graph_size=n, k=k).affinities(feats_s, feats_t, c_s, c_t)
    return Affinities(aff.c_v, aff.c_e, aff.edges_s, aff.edges_t)


def noisy_lawler(aff: Affinities, scale: float, seed: int) -> torch.Tensor:
    """``(num, n*n, n*n)`` Lawler matrices with Gumbel(0, scale) on c_v and c_e, as IMLE's forward pass adds
    (:func:`~lvmmed_monai.ssl.imle.gumbel_noise`)."""
    gen = torch.Generator().manual_seed(seed)
    c_v = aff.c_v + scale * gumbel_noise(aff.c_v.shape, aff.c_v, gen)
    c_e = aff.c_e + scale * gumbel_noise(aff.c_e.shape, aff.c_e, gen)
    return lawler_from_edges(c_v, c_e, aff.edges_s, aff.edges_t)


def timed_solve(K: torch.Tensor, n: int, method: str, options: dict, repeats: int) -> tuple[torch.Tensor, float]:
    """Objectives ``(G,)`` and the fastest of ``repeats`` wall times (after a warm-up on 2 problems)."""
    solve_qap(K[:2], n, method=method, **options)
    times = []
    for _ in range(repeats):
        if K.is_cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        X = solve_qap(K, n, method=method, **options)
        if K.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return qap_objective(K, X), min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-instances", type=int, default=200)
    ap.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per method; the fastest counts")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads for the solvers (default 1: on a small shared CPU, intra-op threading of the "
        "solvers' many small ops mostly waits on the other cores; every method runs with the same setting)",
    )
    args = ap.parse_args()
    n = 16
    affinities: dict[tuple, Affinities] = {}
    summary, default_threads = {}, torch.get_num_threads()
    for regime in args.regimes:
        views, scale = REGIMES[regime]
        key = tuple(sorted(views.items()))
        t0 = time.perf_counter()
        torch.set_num_threads(default_threads)  # the network pass uses every core
        if key not in affinities:
            affinities[key] = lvmmed_like_affinities(args.num_instances, n, seed=args.seed, views=views)
        K = noisy_lawler(affinities[key], scale, args.seed + 1).to(args.device)
        torch.set_num_threads(args.threads)
        print(f"\n[{regime}] {K.shape[0]} instances ({n} nodes, K {tuple(K.shape[1:])}, Gumbel scale {scale}) built "
              f"in {time.perf_counter() - t0:.1f} s; {args.device}, {args.threads} CPU thread(s), best of "
              f"{args.repeats} runs")
        results = {label: timed_solve(K, n, method, options, args.repeats) for label, (method, options)
                   in METHODS.items()}
        t0 = time.perf_counter()
        reference = qap_objective(K, solve_qap(K, n, method=REFERENCE[0], **REFERENCE[1]))
        ref_time = time.perf_counter() - t0
        best = torch.stack([reference, *(obj for obj, _ in results.values())]).amax(0)
        for label, (obj, sec) in [*results.items(), ("reference (tabu 9 x 1000)", (reference, ref_time))]:
            rel = obj / best
            print(f"{label:26s} objective/best-known mean {rel.mean():.4f} min {rel.min():.4f}  "
                  f"solved {(obj >= best - 1e-5 * best.abs()).float().mean():.3f}  {K.shape[0] / sec:9.1f} problems/s")
        ours, rrwm = results["lvmmed"], results["rrwm"]
        summary[regime] = (rrwm[1] / ours[1], (ours[0] / best).mean().item(), (rrwm[0] / best).mean().item())
    print()
    print("; ".join(f"{regime}: lvmmed/rrwm throughput {r:.1f}x, objective/best-known {o:.4f} vs {p:.4f}"
                    for regime, (r, o, p) in summary.items()))


if __name__ == "__main__":
    main()
