"""Run GlobalBatchNorm2d under torchrun (gloo) on this rank's half of a fixed batch; save outputs and grads.

    torchrun --standalone --nproc_per_node=2 _bn_check.py OUT_DIR
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from lvmmed_monai.engines import GlobalBatchNorm2d


def batch_and_module() -> tuple[torch.Tensor, dict]:
    """The fixed batch and BatchNorm parameters both sides use (the test imports this too)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 5, 5, generator=g) * 3 + 1
    return x, {"weight": torch.rand(3, generator=g) + 0.5, "bias": torch.rand(3, generator=g) - 0.5}


def probe(y: torch.Tensor, offset: int) -> torch.Tensor:
    """A fixed non-uniform linear function of the output (so gradients are not trivial)."""
    return (y * (torch.arange(y.numel()).view_as(y).float() + offset).sin()).sum()


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    x, params = batch_and_module()
    bn = GlobalBatchNorm2d(3)
    bn.load_state_dict(params, strict=False)
    part = x.chunk(2)[rank].clone().requires_grad_()
    y = bn(part)
    probe(y, rank * y.numel()).backward()
    torch.save({"y": y.detach(), "grad": part.grad, "weight_grad": bn.weight.grad,
                "running_var": bn.running_var}, f"{sys.argv[1]}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
