"""nnU-Net v2 trainers: lookup through nnUNet_extTrainer, networks from a real plan, end to end on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lvmmed_monai.data import official_resnet50_state
from lvmmed_monai.demo.synthetic import write_nnunet_raw_dataset

TRAINERS = [
    "LVMMedTrainer", "LVMMedTrainer_scratch", "LVMMedTrainer_frozenEncoder", "LVMMedTrainer_warmupUnfreeze",
    "LVMMedTrainer_1epoch", "LVMMedTrainer_1epoch_50iters", "LVMMedTrainer_5epochs",
    "LVMMedTrainer_scratch_5epochs", "LVMMedViTTrainer", "LVMMedViTTrainer_scratch", "LVMMedViTTrainer_5epochs",
]
BIN = Path(sys.executable).parent
DATASET_ID = 501


@pytest.fixture(scope="module")
def planned(module_tmp, nnunet_env) -> Path:
    """A tiny raw dataset, planned and preprocessed by nnU-Net itself (its real 2d plan)."""
    root = module_tmp("nnunet")
    write_nnunet_raw_dataset(root / "raw", DATASET_ID, num_cases=6, size=64)
    subprocess.run([str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "2d", "-np", "1"],
                   env=nnunet_env(root), check=True, capture_output=True)
    return root


def test_every_trainer_is_found_through_ext_trainer(tmp_path, nnunet_env):
    code = (
        "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f\n"
        f"for n in {TRAINERS!r}:\n"
        "    c = f(n); assert c.__name__ == n, (n, c)\n"
        "print('found', len(" + repr(TRAINERS) + "))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=nnunet_env(tmp_path), capture_output=True,
        encoding="utf-8", errors="replace")
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"found {len(TRAINERS)}" in out.stdout


def _plan(root: Path):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    folder = next((root / "pre").glob(f"Dataset{DATASET_ID}_*"))
    return PlansManager(str(folder / "nnUNetPlans.json")).get_configuration("2d"), folder


def test_network_from_real_plan_gives_deep_supervision_shapes(planned, nnunet_env):
    from nnunet_plugin.lvmmed_trainers import LVMMedTrainer, LVMMedViTTrainer

    config, _ = _plan(planned)
    patch = list(config.patch_size)
    scales = 1 / np.cumprod(np.vstack(config.pool_op_kernel_sizes), axis=0)[:-1]  # nnU-Net's own formula
    net_ds = LVMMedTrainer.build_network_architecture(None, config, 1, 3, True)
    net = LVMMedTrainer.build_network_architecture(None, config, 1, 3, False)
    x = torch.rand(2, 1, *patch)
    outs = net_ds(x)
    expected = [tuple(round(p * s) for p, s in zip(patch, sc, strict=True)) for sc in scales]
    assert [tuple(o.shape[2:]) for o in outs] == expected
    assert all(o.shape[:2] == (2, 3) for o in outs)
    assert net(x).shape == (2, 3, *patch)
    assert net_ds.state_dict().keys() == net.state_dict().keys()
    vit = LVMMedViTTrainer.build_network_architecture(None, config, 1, 3, False)
    assert vit(torch.rand(1, 1, *patch)).shape == (1, 3, *patch)


def test_missing_weights_is_a_clear_error_before_training(planned, monkeypatch, nnunet_env):
    from nnunet_plugin.lvmmed_trainers import LVMMedTrainer

    config_folder = _plan(planned)[1]
    dataset_json = json.loads((config_folder / "dataset.json").read_text())
    for key, value in nnunet_env(planned).items():
        if key.startswith("nnUNet"):
            monkeypatch.setenv(key, value)

    def plans() -> dict:  # nnU-Net's run_training adds this key before building the trainer
        return dict(json.loads((config_folder / "nnUNetPlans.json").read_text()), continue_training=False)

    monkeypatch.delenv("LVMMED_WEIGHTS", raising=False)
    with pytest.raises(RuntimeError, match="LVMMED_WEIGHTS"):
        LVMMedTrainer(plans(), "2d", 0, dataset_json, torch.device("cpu"))
    monkeypatch.setenv("LVMMED_WEIGHTS", str(planned / "absent.torch"))
    with pytest.raises(FileNotFoundError, match="absent.torch"):
        LVMMedTrainer(plans(), "2d", 0, dataset_json, torch.device("cpu"))


def test_train_and_predict_end_to_end_scores_dice(planned, nnunet_env):
    """nnUNetv2_train with LVMMedTrainer_1epoch_50iters and LVM-Med-layout weights, nnUNetv2_predict with
    the same -tr, then Dice of the prediction against the reference label."""
    import nibabel as nib

    weights = planned / "lvmmed_resnet.torch"
    torch.save(official_resnet50_state(), weights)
    env = nnunet_env(planned, LVMMED_WEIGHTS=str(weights))
    tr = "LVMMedTrainer_1epoch_50iters"
    train = subprocess.run([str(BIN / "nnUNetv2_train"), str(DATASET_ID), "2d", "0", "-tr", tr, "-device", "cpu"],
                           env=env, capture_output=True, encoding="utf-8", errors="replace")
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    assert "LVM-Med encoder weights from" in train.stdout and "loaded: 318 tensors" in train.stdout
    raw = next((planned / "raw").glob(f"Dataset{DATASET_ID}_*"))
    out_dir = planned / "pred"
    pred = subprocess.run(
        [str(BIN / "nnUNetv2_predict"), "-i", str(raw / "imagesTr"), "-o", str(out_dir), "-d", str(DATASET_ID),
         "-c", "2d", "-f", "0", "-tr", tr, "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"],
        env=nnunet_env(planned), capture_output=True,
            encoding="utf-8", errors="replace")  # no LVMMED_WEIGHTS needed to predict
    assert pred.returncode == 0, pred.stdout[-3000:] + pred.stderr[-3000:]
    dices = []
    for label_file in sorted((raw / "labelsTr").glob("*.nii.gz")):
        ref = np.asarray(nib.load(label_file).dataobj) > 0
        seg = np.asarray(nib.load(out_dir / label_file.name).dataobj) > 0
        assert seg.shape == ref.shape
        dices.append(2 * (ref & seg).sum() / (ref.sum() + seg.sum()))
    # foreground (organ + lesion) after 50 iterations on easy phantoms
    assert np.mean(dices) > 0.5, dices
