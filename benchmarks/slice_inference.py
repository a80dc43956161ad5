"""Slice-by-slice segmentation of a volume: the lvmmed_seg bundle's inferer vs a Python loop over single slices.

Both sides use the same network, built by ``bundles/lvmmed_seg/configs/inference.yaml`` (``network_def``,
default: the LVM-Med ResNet-50 U-Net, random weights with BatchNorm statistics calibrated on a few of the
volume's slices so that its labels vary, eval mode, under ``torch.no_grad``) on the same volume:
a generated CT-like torso phantom of ``--size`` (default 181 x 217 x 181, the size of the MNI/Colin27 1 mm
brain templates) written as NIfTI and read back through the config's own ``preprocessing`` (percentile window,
the encoder's normalisation). The bundle's side is the config's ``inferer``
(:class:`lvmmed_monai.inference.SliceOrImageInferer`: MONAI's ``SliceInferer`` with ``sw_batch_size`` slices
per network call, default from the config); the baseline loops over the slices, one network call per slice,
into a preallocated output. The outputs are checked equal (``allclose``); each side runs ``--repeats`` times,
alternating, and its minimum is reported (the run least disturbed by other processes).

On a 2-core CPU with ``OMP_NUM_THREADS=1`` the default (real) size takes about 2 minutes (about 0.13 s per slice
of 181 x 217 for the ResNet-50 U-Net, 181 slices, 2 sides x 2 repeats); ``--slices N`` times only the first N
slices for a quicker run. The win of batched slices is small on a CPU (the network is compute bound there); on a
GPU it is where the time goes.

    python benchmarks/slice_inference.py [--size 181 217 181] [--slices N] [--sw_batch_size B]
        [--encoder lvmmed_resnet50] [--repeats 2] [--device cpu]

The last line printed is ``ratio bundle inferer / slice loop time: R`` (goal <= 0.8).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigParser

from lvmmed_monai.demo.phantoms import torso_ct

CONFIG = Path(__file__).resolve().parents[1] / "bundles" / "lvmmed_seg" / "configs" / "inference.yaml"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bundle_components(args: argparse.Namespace) -> ConfigParser:
    """inference.yaml parsed with the benchmark's overrides (what ``--key value`` would set)."""
    parser = ConfigParser()
    parser.read_config(str(CONFIG))
    parser["encoder_name"] = args.encoder
    parser["device"] = f"$torch.device('{args.device}')"
    parser["slice_axis"] = 2
    if args.sw_batch_size:
        parser["sw_batch_size"] = args.sw_batch_size
    if args.encoder == "lvmmed_vit_b":
        parser["net_kwargs"] = {"img_size": 224}
    return parser


def load_volume(parser: ConfigParser, size: tuple[int, int, int], slices: int | None, folder: Path) -> torch.Tensor:
    """A torso phantom of ``size`` written as NIfTI, read by the config's preprocessing: ``(1, 1, X, Y, Z)``."""
    volume = torso_ct(np.random.default_rng(0), size).astype(np.int16)
    nib.save(nib.Nifti1Image(volume, np.diag([1.0, 1.0, 1.0, 1.0])), folder / "volume.nii.gz")
    image = parser.get_parsed_content("preprocessing")({"image": str(folder / "volume.nii.gz")})["image"]
    image = torch.as_tensor(image)[None]
    return image[..., :slices] if slices else image


def calibrate(net: torch.nn.Module, volume: torch.Tensor, n: int = 8) -> None:
    """Set the random network's BatchNorm statistics to those of ``n`` of the volume's slices (one forward in
    train mode, momentum 1), so that its logits vary over the volume as a trained network's would and the
    equality check compares real predictions; then eval mode."""
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = 1.0
    index = torch.linspace(0, volume.shape[-1] - 1, min(n, volume.shape[-1])).round().long()
    with torch.no_grad():
        net.train()(volume[0].permute(3, 0, 1, 2)[index.to(volume.device)])
    net.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, nargs=3, default=[181, 217, 181], help="volume X Y Z (slices along Z)")
    ap.add_argument("--slices", type=int, default=None, help="segment only the first N slices (default: all)")
    ap.add_argument("--sw_batch_size", type=int, default=None, help="slices per call (default: inference.yaml's)")
    ap.add_argument("--encoder", default="lvmmed_resnet50", choices=["lvmmed_resnet50", "lvmmed_vit_b"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as set by OMP_NUM_THREADS)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    parser = bundle_components(args)
    net = parser.get_parsed_content("network_def").to(device)
    inferer = parser.get_parsed_content("inferer")
    with tempfile.TemporaryDirectory() as tmp:
        volume = load_volume(parser, tuple(args.size), args.slices, Path(tmp)).to(device)
    depth = volume.shape[-1]
    calibrate(net, volume)

    def bundle() -> torch.Tensor:
        return inferer(volume, net)

    def loop() -> torch.Tensor:
        out = None
        for z in range(depth):
            pred = net(volume[..., z])
            if out is None:
                out = pred.new_empty((*pred.shape, depth))
            out[..., z] = pred
        return out

    sides = {"bundle": bundle, "loop": loop}
    times: dict[str, list[float]] = {name: [] for name in sides}
    outputs: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        net(volume[..., 0])  # warm-up
        for r in range(args.repeats):
            for name in sides if r % 2 == 0 else list(sides)[::-1]:
                _sync(device)
                start = time.perf_counter()
                outputs[name] = sides[name]()
                _sync(device)
                times[name].append(time.perf_counter() - start)
    diff = (outputs["bundle"] - outputs["loop"]).abs().max().item()
    same = torch.allclose(outputs["bundle"], outputs["loop"], rtol=1e-4, atol=1e-4)
    print(f"volume {tuple(volume.shape[2:])} ({depth} slices of {tuple(volume.shape[2:4])}), encoder {args.encoder}, "
          f"device {device}, threads {torch.get_num_threads()}, sw_batch_size {inferer.slice_inferer.sw_batch_size}")
    print(f"outputs equal (allclose, rtol=atol=1e-4): {same}; max |difference| {diff:.2e} (logits std "
          f"{outputs['loop'].std().item():.3f}, {outputs['loop'].argmax(1).unique().numel()} classes predicted)")
    if not same:
        raise SystemExit("the two sides disagree")
    for name, label in (("bundle", "bundle inferer (MONAI SliceInferer, batched slices)"),
                        ("loop", "Python loop over single slices")):
        print(f"{label}: {min(times[name]):.2f} s (runs: {', '.join(f'{t:.2f}' for t in times[name])}; "
              f"{min(times[name]) / depth * 1000:.0f} ms per slice)")
    print(f"ratio bundle inferer / slice loop time: {min(times['bundle']) / min(times['loop']):.3f}")


if __name__ == "__main__":
    main()
