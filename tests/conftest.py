"""Shared fixtures: generated checkpoints in the official LVM-Med layouts (no downloads)."""

from __future__ import annotations

import os
import shutil
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


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory) -> Iterator[Callable[[str], Path]]:
    """``mktemp(name)`` for module-scoped fixtures, deleted when the module's tests end.

    Bundle runs write 0.1-1 GB of checkpoints each; ``tmp_path_factory`` keeps its folders until the session
    ends (a full run held 17 GB and filled CI's disk). Function-scoped ``tmp_path`` folders of passing tests
    go at once through ``tmp_path_retention_policy = "failed"`` in pyproject.toml.
    """
    made: list[Path] = []

    def mktemp(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield mktemp
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


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
