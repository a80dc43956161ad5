"""Multi-process pretraining: process group set-up, synchronised BatchNorm (also on CPU), DDP wrapping.

``torch.nn.SyncBatchNorm`` only runs on GPUs; :class:`GlobalBatchNorm2d` is the same computation with the
statistics all-reduced through ``torch.distributed.nn`` (differentiable), so that a ``gloo`` run on CPU
normalises with the statistics of the global batch like a 1-process run does. On CUDA the native
``SyncBatchNorm`` is used.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.distributed.nn as dist_nn
from torch import nn

from lvmmed_monai.process_group import get_rank, get_world_size, is_distributed, is_main_process

__all__ = ["init_distributed", "distributed_setup", "is_distributed", "get_rank", "get_world_size", "GlobalBatchNorm2d",
           "convert_sync_batchnorm", "wrap_ddp", "is_main_process"]


def init_distributed(backend: str | None = None) -> torch.device:
    """Join the process group that ``torchrun`` describes (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``) and
    return this process's device (``cuda:LOCAL_RANK``, or CPU with the ``gloo`` backend)."""
    if "WORLD_SIZE" not in os.environ:
        raise RuntimeError("multi_gpu_train.yaml runs under torchrun: torchrun --nproc_per_node=N -m monai.bundle "
                           "run --config_file \"['configs/train.yaml','configs/multi_gpu_train.yaml']\"")
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group(backend=backend or ("nccl" if cuda else "gloo"))
    if cuda:
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def distributed_setup(backend: str | None = None) -> dict:
    """:func:`init_distributed` once, then ``{"device", "rank", "world_size"}`` (what the multi-GPU config reads)."""
    import ignite.distributed as idist

    device = init_distributed(backend)
    # ignite's handlers (checkpoint savers) ask ignite for the rank, and ignite's first look at a process group
    # is a collective (it creates a group): made here on every process, or a rank-0-only handler deadlocks
    idist.sync()
    return {"device": device, "rank": dist.get_rank(), "world_size": dist.get_world_size()}


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the batches of all processes (any device, any backend).

    Sums and sums of squares (float64) and counts are all-reduced; the running statistics are updated as by
    ``nn.BatchNorm2d`` (unbiased variance). Outside training or a process group it is plain BatchNorm2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        c = x.shape[1]
        xd = x.double()
        local = torch.cat([xd.sum((0, 2, 3)), (xd * xd).sum((0, 2, 3)), xd.new_full((1,), x.numel() // c)])
        total = dist_nn.all_reduce(local)
        n = total[-1]
        mean = total[:c] / n
        var = (total[c : 2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(m * mean.to(self.running_mean.dtype))
                self.running_var.mul_(1 - m).add_(m * (var * n / (n - 1).clamp_min(1)).to(self.running_var.dtype))
        scale = torch.rsqrt(var + self.eps).to(x.dtype)
        y = (x - mean.to(x.dtype)[None, :, None, None]) * scale[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm2d by a synchronised one: ``nn.SyncBatchNorm`` on CUDA, else
    :class:`GlobalBatchNorm2d`. As ``nn.SyncBatchNorm.convert_sync_batchnorm`` does, the new module takes the
    old one's parameter objects (so their ``requires_grad``, e.g. of frozen stages, and optimizer references
    stay), its buffers and its train / eval mode."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if type(module) is nn.BatchNorm2d:
        new = GlobalBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        if module.track_running_stats:
            new.running_mean, new.running_var = module.running_mean, module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, device))
    return module


def wrap_ddp(model: nn.Module, device: torch.device, sync_bn: bool = True) -> nn.Module:
    """``DistributedDataParallel`` around ``model`` (synchronised BatchNorm first when ``sync_bn``); the
    model itself when not in a process group of several processes."""
    if not is_distributed():
        return model
    if sync_bn:
        model = convert_sync_batchnorm(model, device)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model.to(device), device_ids=ids)
