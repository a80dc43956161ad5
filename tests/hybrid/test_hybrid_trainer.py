"""LVMMedHybridTrainer: found through nnUNet_extTrainer, network built from nnU-Net's own 3d_fullres plan,
trained, continued (``--c``) and used for prediction through nnU-Net's CLI on CPU."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

TRAINERS = ["LVMMedHybridTrainer", "LVMMedHybridTrainer_scratch", "LVMMedHybridTrainer_5epochs",
            "LVMMedHybridTrainer_1epoch_5iters", "LVMMedHybridTrainer_2epochs_5iters"]
BIN = Path(sys.executable).parent
DATASET_ID = 503
TRAINER = "LVMMedHybridTrainer_1epoch_5iters"
RESUMED = "LVMMedHybridTrainer_2epochs_5iters"


def write_phantom_volumes(raw: Path, num_cases: int = 6, shape: tuple[int, int, int] = (40, 40, 12),
                          seed: int = 0, split: str = "Tr") -> Path:
    """Tiny 3D phantoms (an ellipsoid "organ" with a spherical "lesion"), 1 x 1 x 3 mm voxels, nnU-Net raw.

    ``split="Ts"`` with another ``seed``: held-out cases (imagesTs / labelsTs) for nnUNetv2_predict.
    """
    import nibabel as nib

    folder = raw / f"Dataset{DATASET_ID:03d}_LVMMedPhantom3D"
    (folder / f"images{split}").mkdir(parents=True)
    (folder / f"labels{split}").mkdir()
    rng = np.random.default_rng(seed)
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
                 folder / f"images{split}" / f"case_{i:03d}_0000.nii.gz")
        nib.save(nib.Nifti1Image(lab.transpose(2, 1, 0), affine), folder / f"labels{split}" / f"case_{i:03d}.nii.gz")
    if split != "Tr":
        return folder
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


def _cli_env(nnunet_env, root: Path, **extra: str) -> dict[str, str]:
    """nnU-Net's environment for CLI runs on a 2-core CPU: one export / validation worker instead of its
    default 8 spawned processes (``nnUNet_def_n_proc``, also its prediction threads) and one OpenMP thread
    in the augmentation workers; nothing here changes the results."""
    return nnunet_env(root, nnUNet_def_n_proc="1", OMP_NUM_THREADS="1", **extra)


def _train(env: dict[str, str], trainer: str, *flags: str) -> subprocess.CompletedProcess:
    """``nnUNetv2_train 503 3d_fullres 0 -tr trainer -device cpu *flags``."""
    return subprocess.run([str(BIN / "nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "0", "-tr", trainer,
                           "-device", "cpu", *flags], env=env, capture_output=True, encoding="utf-8",
                          errors="replace")


def _plans_file(planned: Path) -> Path:
    return next((planned / "pre").glob(f"Dataset{DATASET_ID}_*")) / "nnUNetPlans.json"


def _fold(planned: Path, trainer: str) -> Path:
    """nnU-Net's output folder of fold 0 of ``trainer``."""
    return next((planned / "res").glob(f"Dataset{DATASET_ID}_*")) / f"{trainer}__nnUNetPlans__3d_fullres" / "fold_0"


def _logged_epochs(fold: Path) -> list[int]:
    """The epochs nnU-Net's own training log(s) in ``fold`` say were run ("<time>: Epoch N" lines)."""
    text = "".join(f.read_text() for f in sorted(fold.glob("training_log_*.txt")))
    return [int(n) for n in re.findall(r": Epoch (\d+)\s*$", text, flags=re.MULTILINE)]


def _dice(ref: np.ndarray, seg: np.ndarray) -> float:
    """2 |A & B| / (|A| + |B|) of two boolean masks; nan when both are empty (as nnU-Net reports it)."""
    total = int(ref.sum() + seg.sum())
    return 2 * float((ref & seg).sum()) / total if total else float("nan")


def _load(checkpoint: Path) -> dict:
    return torch.load(checkpoint, map_location="cpu", weights_only=False)


def _network_logits(planned: Path, weights: dict, image_file: Path) -> torch.Tensor:
    """Logits ``(3, z, y, x)`` of the hybrid network with ``weights``, run here on ``image_file`` normalised as
    nnU-Net's CTNormalization does (clip to the plan's foreground 0.5-99.5 percentiles, minus mean, over std);
    the phantoms are already at the plan's spacing and non-zero everywhere, so nothing is resampled or cropped."""
    import nibabel as nib
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_plugin.lvmmed_hybrid_trainer import LVMMedHybridTrainer

    plans_file = _plans_file(planned)
    props = json.loads(plans_file.read_text())["foreground_intensity_properties_per_channel"]["0"]
    config = PlansManager(str(plans_file)).get_configuration("3d_fullres")
    net = LVMMedHybridTrainer.build_network_architecture(None, config, 1, 3, False)
    net.load_state_dict(weights)
    x = np.asarray(nib.load(image_file).dataobj, dtype=np.float32).transpose(2, 1, 0)  # nnU-Net's (z, y, x)
    x = (np.clip(x, props["percentile_00_5"], props["percentile_99_5"]) - props["mean"]) / props["std"]
    with torch.no_grad():
        return net.eval()(torch.from_numpy(x)[None, None])[0]


@pytest.fixture(scope="module")
def trained(planned, nnunet_env, r50_file) -> subprocess.CompletedProcess:
    """One ``nnUNetv2_train 503 3d_fullres 0 -tr LVMMedHybridTrainer_1epoch_5iters`` run with LVM-Med-layout
    weights, shared by the end-to-end and the ``--c`` test (a CPU epoch plus validation takes about a minute)."""
    train = _train(_cli_env(nnunet_env, planned, LVMMED_WEIGHTS=r50_file), TRAINER)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    return train


def test_train_and_predict_end_to_end_through_nnunet_cli(planned, trained, nnunet_env, r50_state):
    """Training wrote nnU-Net's outputs (final checkpoint of one epoch from the LVM-Med weights, log,
    validation summary that agrees with a numpy Dice), and nnUNetv2_predict with the same -tr segments
    held-out phantoms in their own geometry."""
    import nibabel as nib

    assert "LVM-Med encoder weights from" in trained.stdout and "loaded: 318 tensors" in trained.stdout
    fold = _fold(planned, TRAINER)
    assert _logged_epochs(fold) == [0]
    assert "Training done." in "".join(f.read_text() for f in fold.glob("training_log_*.txt"))
    ckpt = _load(fold / "checkpoint_final.pth")
    assert ckpt["trainer_name"] == TRAINER and ckpt["current_epoch"] == 1
    assert len(ckpt["logging"]["train_losses"]) == 1 and np.isfinite(ckpt["logging"]["train_losses"][0])
    steps = {float(s["step"]) for s in ckpt["optimizer_state"]["state"].values()}
    assert steps == {5.0}  # one epoch of 5 iterations, every trained tensor stepped each time
    # the hybrid's encoder started from the LVM-Med file and was trained: 5 AdamW steps at the epoch's encoder
    # lr (5e-5) move a weight by about 2.5e-4, far less than the gap to any other initialisation (~1e-2)
    moved = [(ckpt["network_weights"][f"net2d.encoder.{k}"] - v).abs().max().item() for k, v in r50_state.items()
             if k.endswith(("weight", "bias")) and not k.startswith(("conv1.", "fc."))]  # conv1: 3 -> 1 channel
    assert len(moved) > 100 and 0 < min(moved) and max(moved) < 1e-3, (min(moved), max(moved))

    raw = next((planned / "raw").glob(f"Dataset{DATASET_ID}_*"))
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    assert len(summary["metric_per_case"]) == 2  # fold 0 of 5 on 6 cases
    for case in summary["metric_per_case"]:
        ref = np.asarray(nib.load(case["reference_file"]).dataobj)
        seg = np.asarray(nib.load(case["prediction_file"]).dataobj)
        assert seg.shape == ref.shape
        for label in ("1", "2"):
            np.testing.assert_allclose(case["metrics"][label]["Dice"], _dice(ref == int(label), seg == int(label)),
                                       rtol=1e-6, equal_nan=True)
    assert 0 <= summary["foreground_mean"]["Dice"] <= 1

    write_phantom_volumes(planned / "raw", num_cases=2, seed=1, split="Ts")
    out_dir = planned / "pred"
    pred = subprocess.run(
        [str(BIN / "nnUNetv2_predict"), "-i", str(raw / "imagesTs"), "-o", str(out_dir), "-d", str(DATASET_ID),
         "-c", "3d_fullres", "-f", "0", "-tr", TRAINER, "-device", "cpu", "--disable_tta", "--save_probabilities",
         "-npp", "1", "-nps", "1"],
        env=_cli_env(nnunet_env, planned), capture_output=True, encoding="utf-8",
        errors="replace")  # no LVMMED_WEIGHTS needed to predict
    assert pred.returncode == 0, pred.stdout[-3000:] + pred.stderr[-3000:]
    patch = json.loads(_plans_file(planned).read_text())["configurations"]["3d_fullres"]["patch_size"]
    dices = []
    for label_file in sorted((raw / "labelsTs").glob("*.nii.gz")):
        ref_img, seg_img = nib.load(label_file), nib.load(out_dir / label_file.name)
        ref, seg = np.asarray(ref_img.dataobj), np.asarray(seg_img.dataobj)
        assert seg.shape == ref.shape and np.allclose(seg_img.affine, ref_img.affine)
        assert set(np.unique(seg)) <= {0, 1, 2}
        dices.append(_dice(ref > 0, seg > 0))
        # the CLI ran the trained hybrid network: its probabilities are the network's own, computed here. The
        # volume is one patch, so nnU-Net's Gaussian weights cancel, but it accumulates the weighted logits in
        # float16: two roundings (2^-11 relative each) of the logits where the weight is a normal float16, as
        # in the middle half along each axis (>= 10 e^-6); the softmax's Jacobian is at most 1/2 (inf-norm),
        # so the probabilities there agree to 2^-11 max |logit| (+ float32 noise)
        probs = np.load(out_dir / label_file.name.replace(".nii.gz", ".npz"))["probabilities"]
        logits = _network_logits(planned, ckpt["network_weights"],
                                 raw / "imagesTs" / label_file.name.replace(".nii.gz", "_0000.nii.gz"))
        assert probs.shape == logits.shape == (3, *ref.shape[::-1]) and list(ref.shape[::-1]) == patch
        middle = (slice(None), *(slice(n // 4, n - n // 4) for n in patch))
        tol = 2**-11 * logits[middle].abs().max().item() + 1e-6
        np.testing.assert_allclose(probs[middle], torch.softmax(logits, 0)[middle].numpy(), rtol=0, atol=tol)
    print(f"held-out foreground Dice after 5 iterations: {np.round(dices, 4)}")
    # 5 iterations prove the pipeline, not the accuracy: the Dice only has to be a real one
    assert len(dices) == 2 and all(0 <= d <= 1 for d in dices), dices


def test_continue_training_resumes_from_the_checkpoint(planned, trained, nnunet_env, r50_file):
    """``nnUNetv2_train ... --c`` continues a 2-epoch run from the checkpoint of its first epoch: it runs
    epoch 1 only and carries on the epoch counter, the logged losses and the optimiser's step counts.

    The 1-epoch run's checkpoint is the state a 2-epoch run of the same network has after epoch 0 (same
    weights, optimiser and logs; the lr schedule is a function of the epoch). Copied in as checkpoint_latest.pth,
    it stands for the periodic save (every 50 epochs in nnU-Net) that an interrupted long run resumes from.
    """
    first = _load(_fold(planned, TRAINER) / "checkpoint_final.pth")
    fold = _fold(planned, RESUMED)
    fold.mkdir(parents=True)
    shutil.copy(_fold(planned, TRAINER) / "checkpoint_final.pth", fold / "checkpoint_latest.pth")
    train = _train(_cli_env(nnunet_env, planned, LVMMED_WEIGHTS=r50_file), RESUMED, "--c")
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    assert _logged_epochs(fold) == [1]  # a restart would log epoch 0 again
    assert not (fold / "checkpoint_latest.pth").exists()  # nnU-Net removes it when the run is finished
    assert (fold / "validation" / "summary.json").is_file()
    final = _load(fold / "checkpoint_final.pth")
    assert final["trainer_name"] == RESUMED and final["current_epoch"] == 2
    losses = final["logging"]["train_losses"]
    assert len(losses) == 2 and losses[0] == first["logging"]["train_losses"][0] and np.isfinite(losses[1])
    assert {float(s["step"]) for s in final["optimizer_state"]["state"].values()} == {10.0}  # 5 + 5 iterations
