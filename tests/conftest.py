"""Shared fixtures: generated checkpoints in the official LVM-Med layouts (no downloads)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from lvmmed_monai.data import official_resnet50_state, official_vit_b_state


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same random state, so failures reproduce."""
    torch.manual_seed(0)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny tensors: intra-op threads only add fork/join waits on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def nnunet_env() -> Callable[..., dict[str, str]]:
    """``env(root, **extra)``: the environment for nnU-Net commands on raw/pre/res folders under ``root``,
    with this package's trainers on ``nnUNet_extTrainer`` (1 augmentation worker: 0 breaks planning)."""
    from nnunet_plugin import PLUGIN_DIR

    def env(root: Path, **extra: str) -> dict[str, str]:
        out = dict(os.environ)
        out.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "pre"),
                   nnUNet_results=str(root / "res"), nnUNet_extTrainer=str(PLUGIN_DIR), nnUNet_n_proc_DA="1",
                   **extra)
        return out

    return env


@pytest.fixture(scope="session")
def r50_state() -> dict[str, torch.Tensor]:
    return official_resnet50_state(seed=0)


@pytest.fixture(scope="session")
def r50_file(tmp_path_factory, r50_state) -> str:
    path = tmp_path_factory.mktemp("weights") / "lvmmed_resnet.torch"
    torch.save(r50_state, path)
    return str(path)


@pytest.fixture(scope="session")
def sam_vit_state() -> dict[str, torch.Tensor]:
    return official_vit_b_state(seed=0)


@pytest.fixture(scope="session")
def vit_file(tmp_path_factory, sam_vit_state) -> str:
    path = tmp_path_factory.mktemp("weights") / "lvmmed_vit.pth"
    torch.save(sam_vit_state, path)
    return str(path)
