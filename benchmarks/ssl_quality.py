"""Does GM-SSL make a better encoder? Frozen and fine-tuned probes on real MR data, all objectives at one budget.

One run, side by side: the same encoder (seeded random init), the same unlabelled data, views, optimiser,
schedule and number of iterations for

* ``gm``: LVM-Med's graph-matching objective as the ``lvmmed_pretrain`` bundle configures it (its train.yaml
  is read with MONAI's ConfigParser: criterion, views, lr, halvings, clipping, first-order warm-up);
* ``gm_no_second_order`` / ``gm_no_gumbel``: the paper's Table 6 ablations (``second_order`` / ``gumbel`` off);
* ``infonce``: SimCLR's NT-Xent (MONAI's ``ContrastiveLoss`` on an MLP projection head,
  :class:`lvmmed_monai.ssl.SimCLRLoss`);
* ``random``: the initial weights, not trained.

Data (Debian's ``mricron-data``: ``apt-get install mricron-data``): the Colin27 T1 brain and the AAL atlas on
its grid. Axial slices are split into alternating blocks of 10 (2 slices dropped at each border), train and
test never closer than 3 mm. Pretraining sees no test slice: the train slices (unlabelled) of ``ch2``,
``ch2bet`` and ``ch2better`` (taken at the same positions) and, by default, every slice along the three axes of
another brain, the INIA19 macaque T1 template (``--unlabelled colin`` leaves it out). Tasks:

* region classification: 64 x 64 mm patches around voxels of the 8 AAL lobes (frontal, insula, limbic,
  occipital, parietal, deep grey, temporal, cerebellum), classed by the lobe of the centre; 100 per lobe from
  the train slices, 50 per lobe from the test slices. Frozen pooled features: kNN (k = 10, cosine) and linear
  probe (logistic regression); the effective rank (RankMe) of the test features is printed as well;
* lobe segmentation: whole axial slices at the image size, label maps of the 8 lobes. Frozen linear probe
  (1x1 convolution on the encoder's hypercolumns) and a short fine-tune of MONAI's FlexibleUNet from each
  encoder; mean Dice over the lobes on the test slices.

    python benchmarks/ssl_quality.py [--iterations 200] [--image-size 64] [--batch-size 32]
        [--methods gm,gm_no_second_order,gm_no_gumbel,infonce] [--set key=value ...] [--device cuda]
        [--probe-every N]

``--set`` overrides any key of the bundle's train.yaml for the GM objectives and the shared recipe (views, lr,
...): the way to try a change at the same budget. ``--probe-every N`` also probes each objective's encoder
every N iterations (effective rank and probe accuracy over training). The last line printed is
``gain over random: X.X  gain over InfoNCE: Y.Y`` (linear-probe points of ``gm`` on region classification).
``--from-saved`` evaluates the encoders of an earlier run again (e.g. after a probe changed) without training.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "bundles" / "lvmmed_pretrain" / "configs" / "train.yaml"
GM_ABLATIONS = {"gm": {}, "gm_no_second_order": {"second_order": False}, "gm_no_gumbel": {"gumbel": False}}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--methods", default="gm,gm_no_second_order,gm_no_gumbel,infonce")
    p.add_argument("--encoder", default="lvmmed_resnet50")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override keys of the bundle's train.yaml (YAML values), e.g. noise_scale=1.0")
    p.add_argument("--temperature", type=float, default=0.1, help="NT-Xent temperature of the InfoNCE baseline")
    p.add_argument("--per-class", type=int, nargs=2, default=(100, 50), metavar=("TRAIN", "TEST"))
    p.add_argument("--finetune-steps", type=int, default=100)
    p.add_argument("--probe-every", type=int, default=0)
    p.add_argument("--unlabelled", choices=["colin", "colin+inia19"], default="colin+inia19",
                   help="pretraining images: Colin27's train slices, plus (default) every slice of INIA19")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--templates", default="/usr/share/mricron/templates")
    p.add_argument("--out", default="outputs/ssl_quality")
    p.add_argument("--seg-probe", choices=["lbfgs", "adam"], default="lbfgs",
                   help="optimiser of the segmentation linear probe: L-BFGS to its objective's minimiser (default) "
                        "or the earlier Adam probe (300 steps; docs/ssl.md's tables before the switch)")
    p.add_argument("--from-saved", action="store_true",
                   help="train nothing: evaluate the encoders an earlier run saved in --out (<out>/<method>/"
                        "encoder.pt, same --seed and --set) with this version's probes; writes reevaluated.json; the "
                        "random init is evaluated only when --methods lists random")
    return p.parse_args()


def bundle_parser(args: argparse.Namespace, data: Path, out: Path, overrides: dict):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(TRAIN))
    base = {"data": str(data), "output_dir": str(out), "image_size": args.image_size, "batch_size": args.batch_size,
            "seed": args.seed, "device": args.device, "encoder_name": args.encoder, "num_workers": 0,
            "progress_bar": False}
    for key, value in {**base, **overrides}.items():
        parser[key] = value
    return parser


def _overrides(args: argparse.Namespace) -> dict:
    """``--set key=value`` pairs, values parsed as YAML."""
    bad = [kv for kv in args.set if "=" not in kv]
    if bad:
        raise SystemExit(f"--set takes key=value pairs, got {bad}")
    return {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)}


def pretrain(method: str, args: argparse.Namespace, data: Path, out: Path, probe=None) -> tuple[dict, list]:
    """Train one objective for ``args.iterations`` iterations from the seeded random init; returns the encoder's
    state dict and the per-iteration log."""
    from lvmmed_monai.data.sampling import derive_seed
    from lvmmed_monai.engines import FirstOrderWarmup, LVMMedPretrainModel, halving_milestones, view_inputs
    from lvmmed_monai.ssl import SimCLRLoss

    overrides = {**_overrides(args), **GM_ABLATIONS.get(method, {})}
    parser = bundle_parser(args, data, out, overrides)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    encoder = parser.get_parsed_content("encoder").to(device)  # same seed -> same init for every method
    if method in GM_ABLATIONS:
        criterion = parser.get_parsed_content("criterion")
        model = LVMMedPretrainModel(encoder, criterion, world_size=1,
                                    local_level=parser.get_parsed_content("local_level")).to(device)
        warmup = FirstOrderWarmup(criterion, int(parser.get_parsed_content("first_order_warmup")))
    elif method == "infonce":
        model = _ContrastiveModel(encoder, SimCLRLoss(encoder.feature_dim, temperature=args.temperature)).to(device)
        warmup = None
    else:
        raise ValueError(f"unknown method {method!r}: use {sorted(GM_ABLATIONS) + ['infonce']}")
    loader = parser.get_parsed_content("train#dataloader")
    sampler = loader.sampler
    lr = float(parser.get_parsed_content("lr"))
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=float(parser.get_parsed_content("weight_decay")))
    sched = torch.optim.lr_scheduler.MultiStepLR(
        opt, halving_milestones(args.iterations, int(parser.get_parsed_content("lr_halvings"))), gamma=0.5)
    clip = parser.get_parsed_content("clip_grad_norm")
    gen = torch.Generator(device=device)
    log, it, epoch, start = [], 0, 0, time.perf_counter()
    while it < args.iterations:
        sampler.set_epoch(epoch)
        epoch += 1
        for batch in loader:
            it += 1
            gen.manual_seed(derive_seed(args.seed, it, 0))
            x = view_inputs(batch, device)
            model.train()
            loss, stats = model(**x, generator=gen, **(warmup.overrides(it) if warmup is not None else {}))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), float(clip) if clip else float("inf"))
            opt.step()
            sched.step()
            entry = {"iteration": it, "loss": float(loss.detach()), "retrieval": float(stats["retrieval_accuracy"])}
            if probe is not None and args.probe_every and it % args.probe_every == 0:
                entry.update(probe(encoder))
                print(f"  {method} it {it}: " + " ".join(f"{k} {v:.3f}" for k, v in entry.items()
                                                          if k != "iteration"), flush=True)
            log.append(entry)
            if it >= args.iterations:
                break
        print(f"  {method}: iteration {it}/{args.iterations}, loss {np.mean([e['loss'] for e in log[-10:]]):.3f}, "
              f"retrieval {np.mean([e['retrieval'] for e in log[-10:]]):.3f}, {time.perf_counter() - start:.0f} s",
              flush=True)
    return {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()}, log


class _ContrastiveModel(torch.nn.Module):
    """Encoder + SimCLRLoss with LVMMedPretrainModel's call signature (views and coordinates in, loss out);
    SimCLR's two global views only (multi-crop local views, ``--set local_crops=N``, are not used)."""

    def __init__(self, encoder: torch.nn.Module, criterion: torch.nn.Module) -> None:
        super().__init__()
        self.encoder, self.criterion = encoder, criterion

    def forward(self, image_s, image_t, coords_s=None, coords_t=None, generator=None, local_images=(),
                local_coords=(), **overrides):
        n = image_s.shape[0]
        feats = self.encoder.feature_map(torch.cat([image_s, image_t]))
        return self.criterion(feats[:n], feats[n:])


def evaluate(state: dict, tasks: dict, args: argparse.Namespace, finetune: bool = True) -> dict:
    """Frozen kNN / linear probe / effective rank on region classification; segmentation probe and fine-tune."""
    from lvmmed_monai.engines import build_encoder, input_normalization
    from lvmmed_monai.evaluation import (
        effective_rank,
        embed,
        finetune_segmentation_dice,
        knn_accuracy,
        linear_probe_accuracy,
        segmentation_probe_dice,
    )

    mean, std = input_normalization(args.encoder)
    encoder = build_encoder(args.encoder, args.image_size, weights=state)
    xtr, ytr, xte, yte = tasks["cls"]
    ftr, fte = embed(encoder, xtr, mean, std), embed(encoder, xte, mean, std)
    res = {"knn": knn_accuracy(ftr, ytr, fte, yte, k=10), "linear": linear_probe_accuracy(ftr, ytr, fte, yte),
           "rank": effective_rank(fte)}
    if finetune:
        s = tasks["seg"]
        n = len(tasks["names"]) + 1
        res["seg_linear"] = segmentation_probe_dice(encoder, mean, std, *s, num_classes=n, seed=args.seed,
                                                    optimizer=args.seg_probe,
                                                    steps=500 if args.seg_probe == "lbfgs" else 300)
        if args.finetune_steps:
            res["seg_finetune"] = finetune_segmentation_dice(state, mean, std, *s, num_classes=n,
                                                             steps=args.finetune_steps, seed=args.seed)
    return res


def main() -> None:
    args = parse_args()
    from monai.data import set_track_meta

    from lvmmed_monai.io import atomic_open

    set_track_meta(False)
    start = time.perf_counter()
    out = Path(args.out)
    from lvmmed_monai.data.atlas import colin27_tasks, write_slice_pngs

    tasks = colin27_tasks(args.templates, args.image_size, tuple(args.per_class), args.unlabelled, args.seed)
    data = out / "unlabelled"
    shutil.rmtree(data, ignore_errors=True)  # no stale slices from a run with other --unlabelled
    n_unlabelled = write_slice_pngs(tasks["unlabelled"], data)
    xtr, ytr, xte, yte = tasks["cls"]
    print(f"data: {len(tasks['train_z'])} train / {len(tasks['test_z'])} test axial slices (disjoint blocks); "
          f"region classification {len(ytr)} / {len(yte)} patches, 8 lobes (chance 0.125); segmentation "
          f"{len(tasks['seg'][0])} / {len(tasks['seg'][2])} slices; {n_unlabelled} unlabelled "
          f"(non-blank) pretraining slices; {args.encoder} at {args.image_size} px, {args.iterations} iterations "
          f"of batch {args.batch_size}", flush=True)
    from lvmmed_monai.engines import build_encoder

    results, logs = {}, {}
    torch.manual_seed(args.seed)  # the initial weights of every objective (pretrain() seeds alike)
    start_enc = bundle_parser(args, data, out / "random", _overrides(args)).get_parsed_content("encoder")
    torch.manual_seed(args.seed)
    standard = build_encoder(args.encoder, args.image_size)  # torchvision-style init, no --set
    inits = {"random": start_enc.state_dict()}
    standard_state = standard.state_dict()
    if any(not torch.equal(v, standard_state[k]) for k, v in inits["random"].items()):
        inits["random (standard init)"] = standard_state
    methods = args.methods.split(",")
    if args.from_saved and "random" not in methods:
        inits = {}  # the random-init rows of this seed are another run's (list "random" to evaluate them)
    methods = [m for m in methods if m != "random"]
    for name, state in inits.items():
        results[name] = evaluate({k: v.clone() for k, v in state.items()}, tasks, args)
        print(f"  {name}: {results[name]}", flush=True)

    def probe(encoder: torch.nn.Module) -> dict:
        r = evaluate({k: v.detach().cpu() for k, v in encoder.state_dict().items()}, tasks, args, finetune=False)
        return {"probe_linear": r["linear"], "probe_knn": r["knn"], "rank": r["rank"]}

    for method in methods:
        t0 = time.perf_counter()
        if args.from_saved:
            path = out / method / "encoder.pt"
            if not path.is_file():
                print(f"  {method}: skipped, no {path} (run without --from-saved to train it)", flush=True)
                continue
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            state, logs[method] = pretrain(method, args, data, out / method, probe=probe)
            with atomic_open(out / method / "encoder.pt") as fh:
                torch.save(state, fh)
        results[method] = evaluate(state, tasks, args)
        results[method]["minutes"] = (time.perf_counter() - t0) / 60
        print(f"  {method}: {results[method]}", flush=True)
    with atomic_open(out / ("reevaluated.json" if args.from_saved else "results.json"), "w") as fh:
        json.dump({"args": vars(args), "results": results, "logs": logs}, fh, indent=1)
    cols = [("knn", "region kNN"), ("linear", "region linear"), ("rank", "eff. rank"),
            ("seg_linear", "seg linear Dice"), ("seg_finetune", "seg fine-tune Dice")]
    print(f"\n{'encoder':<22}" + "".join(f"{c:>20}" for _, c in cols))
    for name, r in results.items():
        print(f"{name:<22}" + "".join(f"{r.get(k, float('nan')):>20.3f}" for k, _ in cols))
    print(f"wall time {(time.perf_counter() - start) / 60:.1f} min")
    gm = results.get("gm", {}).get("linear", float("nan"))
    gain_random = 100 * (gm - max((r["linear"] for name, r in results.items() if name.startswith("random")),
                                  default=float("nan")))
    gain_infonce = 100 * (gm - results.get("infonce", {}).get("linear", float("nan")))
    print(f"gain over random: {gain_random:.1f}  gain over InfoNCE: {gain_infonce:.1f}")


if __name__ == "__main__":
    main()
