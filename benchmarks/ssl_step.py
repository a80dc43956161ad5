"""One SSL training step: ResNet-50 + LVMMedLoss vs ResNet-50 + InfoNCE (MONAI ContrastiveLoss), same batch.

Both steps run forward + backward + Adam step of a torchvision ResNet-50 trunk (weights=None, no avgpool/fc)
on the two views of the same batch (made once with ``LVMMedViewsd``); the baseline pools, projects
(``Linear(2048, 128)``, like LVM-Med's projector) and applies ``monai.losses.ContrastiveLoss`` (NT-Xent).
The two steps alternate within each repeat so that load from other processes hits both alike; medians
are reported. A second, instrumented run of our step splits its time into encoder forward/backward,
affinities (projector + kNN + GCN + c_v + c_e, forward and backward) and the solver's forward (perturbed
matching) and backward (IMLE's second solve), by cutting the graph with ``detach`` between the stages.

    python benchmarks/ssl_step.py [--batch 64] [--size 96] [--device cpu] [--repeats 5] [--warmup 1]

The last line printed is ``ratio ours/baseline step time: R``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from monai.losses import ContrastiveLoss
from torch import nn
from torchvision.models import resnet50

from lvmmed_monai.data.views import LVMMedViewsd
from lvmmed_monai.ssl.imle import hamming_loss, imle_qap
from lvmmed_monai.ssl.loss import LVMMedLoss


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def make_batch(batch: int, size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Two views and their coordinate maps of ``batch`` random 1-channel images (replicated to RGB)."""
    views = LVMMedViewsd("image", size=size, out_channels=3).set_random_state(0)
    items = [views({"image": torch.rand(1, size + 32, size + 16)}) for _ in range(batch)]
    keys = ("image_s", "image_t", "coords_s", "coords_t")
    return {k: torch.stack([it[k] for it in items]).to(device) for k in keys}


def trunk_features(trunk: nn.Module, x_s: torch.Tensor, x_t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Both views through the trunk in one batch (as in both compared steps)."""
    feats = trunk(torch.cat([x_s, x_t]))
    return feats[: x_s.shape[0]], feats[x_s.shape[0] :]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--graph-size", type=int, default=16)
    parser.add_argument("--method", default="lvmmed", help="QAP solver of solve_qap")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    data = make_batch(args.batch, args.size, device)

    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(*list(resnet50(weights=None).children())[:-2]).to(device).train()

    trunk_ours, trunk_base = build(), build()
    criterion = LVMMedLoss(in_dim=2048, graph_size=args.graph_size, method=args.method).to(device)
    proj = nn.Linear(2048, 128).to(device)
    nt_xent = ContrastiveLoss(temperature=0.5)
    opt_ours = torch.optim.Adam([*trunk_ours.parameters(), *criterion.parameters()], lr=1e-4)
    opt_base = torch.optim.Adam([*trunk_base.parameters(), *proj.parameters()], lr=1e-4)
    gen = torch.Generator(device=device).manual_seed(0)

    def step_ours() -> dict[str, torch.Tensor]:
        opt_ours.zero_grad(set_to_none=True)
        fs, ft = trunk_features(trunk_ours, data["image_s"], data["image_t"])
        loss, stats = criterion(fs, ft, data["coords_s"], data["coords_t"], generator=gen)
        loss.backward()
        opt_ours.step()
        return stats

    def step_base() -> None:
        opt_base.zero_grad(set_to_none=True)
        fs, ft = trunk_features(trunk_base, data["image_s"], data["image_t"])
        loss = nt_xent(proj(fs.mean((2, 3))), proj(ft.mean((2, 3))))
        loss.backward()
        opt_base.step()

    def step_split() -> dict[str, float]:
        """Our step cut into stages with detach, to time each stage alone (same total work)."""
        t: dict[str, float] = {}
        opt_ours.zero_grad(set_to_none=True)
        t["encoder forward"], (fs, ft) = _timed(
            lambda: trunk_features(trunk_ours, data["image_s"], data["image_t"]), device)
        fs_d, ft_d = fs.detach().requires_grad_(), ft.detach().requires_grad_()
        t["affinities forward"], aff = _timed(
            lambda: criterion.affinities(fs_d, ft_d, data["coords_s"], data["coords_t"]), device)
        cv, ce = aff.c_v.detach().requires_grad_(), aff.c_e.detach().requires_grad_()

        def solve() -> torch.Tensor:
            noise = "gumbel" if criterion.gumbel else "constant"
            x = imle_qap(cv, ce, aff.edges_s, aff.edges_t, lam=criterion.lam, noise=noise, generator=gen,
                         num_samples=criterion.num_samples, second_order=criterion.second_order,
                         method=criterion.method)
            return hamming_loss(x).mean()

        t["solver forward"], loss = _timed(solve, device)
        t["solver backward"], _ = _timed(lambda: loss.backward(), device)
        t["affinities backward"], _ = _timed(
            lambda: torch.autograd.backward([aff.c_v, aff.c_e], [cv.grad, ce.grad]), device)
        t["encoder backward"], _ = _timed(
            lambda: torch.autograd.backward([fs, ft], [fs_d.grad, ft_d.grad]), device)
        t["optimizer step"], _ = _timed(opt_ours.step, device)
        return t

    for _ in range(args.warmup):
        step_base(), step_ours(), step_split()
    ours, base, parts = [], [], []
    stats = {}
    for _ in range(args.repeats):
        dt, _ = _timed(step_base, device)
        base.append(dt)
        dt, stats = _timed(step_ours, device)
        ours.append(dt)
    for _ in range(args.repeats):
        parts.append(step_split())

    med_ours, med_base = statistics.median(ours), statistics.median(base)
    print(f"device {device}, batch {args.batch}, size {args.size}, graph size {args.graph_size}, "
          f"threads {torch.get_num_threads()}, repeats {args.repeats}, solver {args.method}")
    fmap = -(-args.size // 32)
    print(f"feature map 2048 x {fmap} x {fmap}, graphs per step {args.batch // args.graph_size}")
    print("our step, split by stage (median seconds):")
    for name in parts[0]:
        print(f"  {name:22s} {statistics.median(p[name] for p in parts):8.4f}")
    print(f"  {'sum':22s} {statistics.median(sum(p.values()) for p in parts):8.4f}")
    print("stats of the last step: " + ", ".join(f"{k} {float(v):.3f}" for k, v in stats.items()))
    print(f"baseline step (ResNet-50 + ContrastiveLoss): {med_base:.4f} s  (all: "
          + ", ".join(f"{x:.3f}" for x in base) + ")")
    print(f"our step (ResNet-50 + LVMMedLoss):           {med_ours:.4f} s  (all: "
          + ", ".join(f"{x:.3f}" for x in ours) + ")")
    print(f"ratio ours/baseline step time: {med_ours / med_base:.3f}")


if __name__ == "__main__":
    main()
