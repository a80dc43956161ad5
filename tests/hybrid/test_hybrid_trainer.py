"""LVMMedHybridTrainer: found through nnUNet_extTrainer, network built from nnU-Net's own 3d_fullres plan."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

TRAINERS = ["LVMMedHybridTrainer", "LVMMedHybridTrainer_scratch", "LVMMedHybridTrainer_5epochs",
            "LVMMedHybridTrainer_1epoch_5iters"]
BIN = Path(sys.executable).parent
DATASET_ID = 503


def write_phantom_volumes(raw: Path, num_cases: int = 6, shape: tuple[int, int, int] = (40, 40, 12)) -> Path:
    """Tiny 3D phantoms (an ellipsoid "organ" with a spherical "lesion"), 1 x 1 x 3 mm voxels, nnU-Net raw."""
    import nibabel as nib

    folder = raw / f"Dataset{DATASET_ID:03d}_LVMMedPhantom3D"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    zz, yy, xx = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape[::-1]), indexing="ij")
    for i in range(num_cases):
        c = rng.uniform(-0.2, 0.2, 3)
        a = rng.uniform(0.4, 0.7, 3)
        organ = ((zz - c[0]) / a[0]) ** 2 + ((yy - c[1]) / a[1]) ** 2 + ((xx - c[2]) / a[2]) ** 2 <= 1
        lesion = ((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2] - 0.2) ** 2 <= 0.04) & organ
        img = 200 + 400 * organ + 300 * lesion + rng.normal(0, 20, organ.shape)
        lab = organ.astype(np.uint8) + lesion.astype(np.uint8)
        affine = np.diag([1.0, 1.0, 3.0, 1.0])
        nib.save(nib.Nifti1Image(img.transpose(2, 1, 0).astype(np.float32), affine),
                 folder / "imagesTr" / f"case_{i:03d}_0000.nii.gz")
        nib.save(nib.Nifti1Image(lab.transpose(2, 1, 0), affine), folder / "labelsTr" / f"case_{i:03d}.nii.gz")
    meta = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1, "lesion": 2},
            "numTraining": num_cases, "file_ending": ".nii.gz", "name": "LVMMedPhantom3D"}
    (folder / "dataset.json").write_text(json.dumps(meta, indent=2))
    return folder


@pytest.fixture(scope="module")
def planned(module_tmp, nnunet_env) -> Path:
    """The phantoms planned and preprocessed by nnU-Net itself (its real 3d_fullres plan)."""
    root = module_tmp("nnunet3d")
    write_phantom_volumes(root / "raw")
    subprocess.run([str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "1"],
                   env=nnunet_env(root), check=True, capture_output=True)
    return root


def test_hybrid_trainers_are_found_through_ext_trainer(tmp_path, nnunet_env):
    code = (
        "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f\n"
        "from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer\n"
        f"for n in {TRAINERS!r}:\n"
        "    c = f(n); assert c.__name__ == n and issubclass(c, nnUNetTrainer), (n, c)\n"
        f"print('found', {len(TRAINERS)})"
    )
    out = subprocess.run([sys.executable, "-c", code], env=nnunet_env(tmp_path), capture_output=True,
        encoding="utf-8", errors="replace")
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"found {len(TRAINERS)}" in out.stdout


def test_network_from_real_3d_plan_gives_nnunet_deep_supervision_shapes(planned, nnunet_env):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_plugin.lvmmed_hybrid_trainer import LVMMedHybridTrainer

    folder = next((planned / "pre").glob(f"Dataset{DATASET_ID}_*"))
    config = PlansManager(str(folder / "nnUNetPlans.json")).get_configuration("3d_fullres")
    patch = list(config.patch_size)
    assert len(patch) == 3
    scales = 1 / np.cumprod(np.vstack(config.pool_op_kernel_sizes), axis=0)[:-1]  # nnU-Net's own formula
    net_ds = LVMMedHybridTrainer.build_network_architecture(None, config, 1, 3, True)
    net = LVMMedHybridTrainer.build_network_architecture(None, config, 1, 3, False)
    x = torch.rand(2, 1, *patch)
    outs = net_ds(x)
    expected = [tuple(round(p * s) for p, s in zip(patch, sc, strict=True)) for sc in scales]
    assert [tuple(o.shape[2:]) for o in outs] == expected and all(o.shape[:2] == (2, 3) for o in outs)
    sum(o.float().mean() for o in outs).backward()
    assert net_ds.encoder.conv1.weight.grad is not None
    with torch.no_grad():
        assert net(x).shape == (2, 3, *patch)
    assert net_ds.state_dict().keys() == net.state_dict().keys()
    with pytest.raises(ValueError, match="3D configuration"):
        LVMMedHybridTrainer.build_network_architecture(
            None, SimpleNamespace(patch_size=[64, 64], pool_op_kernel_sizes=[[1, 1], [2, 2]]), 1, 3)
