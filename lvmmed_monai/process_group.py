"""Which process this is (rank, number of processes), for every layer: data preparation runs on rank 0 only,
engines average over processes. Plain queries of ``torch.distributed``, 0 / 1 outside a process group; setting
the group up and DDP live in :mod:`lvmmed_monai.engines.distributed`.

Not ignite's ``idist.get_rank``: ignite fixes its computation model at its first call, and the data layer asks
before the bundle's process group exists.
"""

from __future__ import annotations

import torch.distributed as dist

__all__ = ["is_distributed", "get_rank", "get_world_size", "is_main_process"]


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """The number of processes (1 outside a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0
