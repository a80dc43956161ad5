"""Cost of box-prompted segmentation (``lvmmed_sam``): a training step with the image encoder frozen vs
fine-tuned, and inference per 2D image against the UNETR-style network of ``lvmmed_seg`` at the same size.

Training step: ``LVMMedSAM`` (LVM-Med ViT-B + SAM's prompt encoder and mask decoder) on a batch of ``--batch``
grey images with one box each, Dice + BCE loss (MONAI ``DiceCELoss(sigmoid=True)``, the bundle's), AdamW step on
the trainable parameters. Frozen: the encoder runs without gradients and only the mask decoder trains (the
bundle's default); fine-tuned: the encoder trains too (``--freeze_encoder false``). Inference: one image, one
box, eval mode, no gradients, against ``LVMMedViTUNETR`` (same ViT-B, UNETR-style decoder, 3 classes). Both
sides of each comparison start from the same weights and alternate within each repeat (the order switching
every repeat) so that load from other processes hits both alike; reported: the minimum over repeats (the run
least disturbed), and the median of the per-repeat ratios.

    python benchmarks/sam_step.py [--size 256] [--batch 2] [--repeats 5] [--threads N] [--device cpu]

The last line printed is ``ratios: fine-tuned/frozen training step R1, box-prompted/UNETR inference R2``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from monai.losses import DiceCELoss

from lvmmed_monai.networks import LVMMedSAM, LVMMedViTUNETR


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def compare(a: Callable[[], None], b: Callable[[], None], repeats: int, device: torch.device
            ) -> tuple[float, float, float]:
    """``(min a, min b, median of b/a)``, the two alternating after one warm-up each."""
    a(), b()
    times_a, times_b = [], []
    for r in range(repeats):
        order = ((a, times_a), (b, times_b)) if r % 2 == 0 else ((b, times_b), (a, times_a))
        for fn, out in order:
            out.append(timed(fn, device))
    return min(times_a), min(times_b), statistics.median(tb / ta for ta, tb in zip(times_a, times_b, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="image size (a multiple of 16)")
    parser.add_argument("--batch", type=int, default=2, help="images per training step (one box each)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    size = args.size
    print(f"device {device}, {torch.get_num_threads()} threads, {size} x {size} px, batch {args.batch}, "
          f"{args.repeats} repeats")

    nets = {}
    for frozen in (True, False):
        torch.manual_seed(0)  # the same weights on both sides
        nets[frozen] = LVMMedSAM(img_size=size, in_channels=1, freeze_encoder=frozen).to(device).train()
    loss_fn = DiceCELoss(sigmoid=True)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 1, size, size, generator=gen).to(device)
    targets = (torch.rand(args.batch, 1, size, size, generator=gen) > 0.7).float().to(device)
    boxes = torch.tensor([[size * 0.1, size * 0.2, size * 0.7, size * 0.8]] * args.batch, device=device)

    def step(net: LVMMedSAM) -> Callable[[], None]:
        opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)

        def run() -> None:
            opt.zero_grad(set_to_none=True)
            loss_fn(net(images, boxes), targets).backward()
            opt.step()

        return run

    trainable = {f: sum(p.numel() for p in n.parameters() if p.requires_grad) for f, n in nets.items()}
    frozen_t, tuned_t, step_ratio = compare(step(nets[True]), step(nets[False]), args.repeats, device)
    print(f"training step, encoder frozen:     {frozen_t * 1000:8.1f} ms ({trainable[True] / 1e6:.1f} M trainable)")
    print(f"training step, encoder fine-tuned: {tuned_t * 1000:8.1f} ms ({trainable[False] / 1e6:.1f} M trainable); "
          f"median ratio {step_ratio:.2f}")

    sam = nets[True].eval()
    torch.manual_seed(0)
    unetr = LVMMedViTUNETR(in_channels=1, out_channels=3, img_size=size).to(device).eval()
    one, box = images[:1], boxes[:1]

    def infer_sam() -> None:
        with torch.no_grad():
            sam(one, box)

    def infer_unetr() -> None:
        with torch.no_grad():
            unetr(one)

    unetr_t, sam_t, infer_ratio = compare(infer_unetr, infer_sam, args.repeats, device)
    print(f"inference per 2D image, box-prompted (1 box): {sam_t * 1000:8.1f} ms")
    print(f"inference per 2D image, UNETR-style:          {unetr_t * 1000:8.1f} ms; median ratio {infer_ratio:.2f}")
    print(f"ratios: fine-tuned/frozen training step {tuned_t / frozen_t:.2f}, box-prompted/UNETR inference "
          f"{sam_t / unetr_t:.2f}")


if __name__ == "__main__":
    main()
