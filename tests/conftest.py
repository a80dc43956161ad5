"""Shared fixtures: generated checkpoints in the official LVM-Med layouts (no downloads)."""

from __future__ import annotations

import pytest
import torch

from lvmmed_monai.data import official_resnet50_state, official_vit_b_state


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same random state, so failures reproduce."""
    torch.manual_seed(0)


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
