"""The pieces of benchmarks/ssl_quality.py on tiny synthetic inputs (no mricron-data needed): atlas tasks and
their disjoint-slice split, the InfoNCE baseline against MONAI's ContrastiveLoss and the paper's formula, and
the probes (effective rank, Dice, segmentation probe) against values known by construction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.losses import ContrastiveLoss
from torch import nn

from lvmmed_monai.data.atlas import (
    aal_lobe_lookup,
    disjoint_slice_split,
    normalize_volume,
    region_patches,
    segmentation_slices,
)
from lvmmed_monai.evaluation import effective_rank, mean_dice, segmentation_probe_dice
from lvmmed_monai.ssl import SimCLRLoss


@pytest.mark.parametrize("n, block, gap", [(146, 10, 2), (37, 6, 1), (20, 4, 0)])
def test_split_is_disjoint_alternating_and_keeps_a_gap(n, block, gap):
    slices = np.arange(5, 5 + n)
    train, test = disjoint_slice_split(slices, block=block, gap=gap)
    assert len(train) and len(test) and not set(train) & set(test)
    assert np.abs(train[:, None] - test[None, :]).min() > gap  # no test slice within `gap` of a train slice
    assert train[0] == slices[0]  # the first block is train, kept from its first slice
    # brute force: the block of each kept slice decides its side
    for s in np.concatenate([train, test]):
        assert ((s - 5) // block) % 2 == (0 if s in train else 1)
    dropped = set(slices) - set(train) - set(test)
    assert len(dropped) <= 2 * gap * (n // block)
    with pytest.raises(ValueError, match="2 \\* gap < block"):
        disjoint_slice_split(slices, block=4, gap=2)


def test_aal_lookup_groups_by_first_code_digit(tmp_path):
    txt = tmp_path / "aal.nii.txt"
    txt.write_text("1 Precentral_L 2001\n2 Insula_L 3001\n3 Cingulum_Ant_L 4001\n7 Cerebelum_3_L 9031\n"
                   "9 Frontal_Sup_R 2102\n")
    lookup, names = aal_lobe_lookup(txt)
    assert names == ["frontal", "insula", "limbic", "cerebellum"]
    assert lookup.tolist() == [0, 1, 2, 3, 0, 0, 0, 4, 0, 1]
    (tmp_path / "bad.txt").write_text("nothing here\n")
    with pytest.raises(ValueError, match="bad.txt"):
        aal_lobe_lookup(tmp_path / "bad.txt")


def _volume() -> tuple[np.ndarray, np.ndarray]:
    """A 40 x 48 x 12 volume whose voxel values encode their own (x, y) and a 3-class map of quadrants."""
    x, y, _ = np.meshgrid(np.arange(40), np.arange(48), np.arange(12), indexing="ij")
    image = (x * 48 + y).astype(np.float32) / (40 * 48)
    classes = np.zeros((40, 48, 12), dtype=np.int64)
    classes[5:20, 5:20] = 1
    classes[20:35, 5:20] = 2
    classes[5:35, 25:40] = 3
    return image, classes


def test_region_patches_are_centred_on_a_voxel_of_their_class():
    image, classes = _volume()
    x, y = region_patches(image, classes, np.array([2, 7]), patch=8, per_class=30, seed=0)
    assert x.shape == (90, 1, 8, 8) and np.bincount(y.numpy()).tolist() == [30, 30, 30]
    centre = (x[:, 0, 4, 4].numpy() * 40 * 48).round().astype(int)  # pixel (4, 4) = the chosen voxel
    vx, vy = centre // 48, centre % 48
    assert (classes[vx, vy, 0] == y.numpy() + 1).all()
    # only the given slices are used: a class present only in slice 0 yields nothing
    classes2 = classes.copy()
    classes2[:, :, 1:] = 0
    with pytest.raises(ValueError, match="no labelled voxel"):
        region_patches(image, classes2, np.array([3]), patch=8)


def test_segmentation_slices_pad_to_square_and_keep_labels():
    image, classes = _volume()
    x, y = segmentation_slices(image, classes, np.array([0, 5, 11]), size=24)
    assert x.shape == (3, 1, 24, 24) and y.shape == (3, 24, 24) and y.dtype == torch.long
    assert set(y.unique().tolist()) == {0, 1, 2, 3} and 0.0 <= x.min() and x.max() <= 1.0
    # 40 x 48 padded to 48 x 48 (4 rows each side) then halved: class 1 rows 5..19 -> 4.5..11.5
    assert (y[0, 5:11, 3:9] == 1).all() and (y[0, :2] == 0).all()
    with pytest.raises(ValueError, match="constant"):
        normalize_volume(np.ones((4, 4, 4)))


def test_simclr_loss_is_monai_contrastive_loss_and_nt_xent():
    torch.manual_seed(0)
    crit = SimCLRLoss(in_dim=16, proj_dim=8, hidden_dim=32, temperature=0.2).eval()
    fs, ft = torch.randn(6, 16, 2, 2), torch.randn(6, 16, 2, 2)
    loss, stats = crit(fs, ft)
    z = crit.projector(torch.cat([fs.mean((2, 3)), ft.mean((2, 3))]))
    assert torch.allclose(loss, ContrastiveLoss(temperature=0.2)(z[:6], z[6:]))
    # NT-Xent written out (Chen et al. 2020, Eq. 1): positives i <-> i + N, all other 2N - 2 as negatives
    u = F.normalize(z, dim=1)
    sim = u @ u.T / 0.2
    sim.fill_diagonal_(float("-inf"))
    pos = torch.cat([torch.arange(6, 12), torch.arange(6)])
    assert torch.allclose(loss, F.cross_entropy(sim, pos), atol=1e-5)
    assert 0.0 <= float(stats["retrieval_accuracy"]) <= 1.0
    loss.backward()  # gradients reach the projection head
    assert crit.projector[0].weight.grad is not None
    # identical views of well-separated images: retrieval is perfect
    _, stats = crit(fs, fs.clone())
    assert float(stats["retrieval_accuracy"]) == 1.0
    with pytest.raises(ValueError, match="feats_s"):
        crit(torch.randn(6, 8, 2, 2), ft)


def test_effective_rank_counts_equal_directions():
    basis = torch.linalg.qr(torch.randn(64, 64))[0]
    for r in (1, 4, 16):
        signs = torch.tensor([[1.0], [-1.0]]).repeat(r, 1)  # each axis +-1: centred, equal singular values
        x = torch.zeros(2 * r, 64)
        x[torch.arange(2 * r), torch.arange(r).repeat_interleave(2)] = signs[:, 0]
        assert effective_rank(x @ basis) == pytest.approx(r, rel=1e-6)


def test_mean_dice_by_hand():
    target = torch.zeros(2, 4, 4, dtype=torch.long)
    target[0, :2] = 1  # 8 pixels of class 1
    target[1, :, :1] = 2  # 4 pixels of class 2
    pred = target.clone()
    pred[0, 0] = 0  # class 1: 4 of 8 found -> Dice 2*4 / (4 + 8) = 2/3
    assert mean_dice(pred, target, 3) == pytest.approx((2 / 3 + 1.0) / 2)
    assert mean_dice(target, target, 3) == 1.0


class _OracleEncoder(nn.Module):
    """Stage outputs whose channels are the one-hot labels (strides 4..32), as a perfect frozen encoder."""

    def __init__(self, labels: dict[int, torch.Tensor]) -> None:
        super().__init__()
        self.labels = labels

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        onehot = torch.stack([self.labels[int(v)] for v in x[:, 0, 0, 0].round()])  # the image's id in pixel 0
        return [onehot] + [F.avg_pool2d(onehot, s) for s in (4, 8, 16, 32)]


def test_segmentation_probe_reaches_dice_one_with_label_features():
    torch.manual_seed(0)
    labels = torch.zeros(6, 32, 32, dtype=torch.long)
    for i in range(6):
        labels[i, 4 + i:20 + i, 8:24] = 1 + i % 2
    onehot = {i: F.one_hot(labels[i], 3).permute(2, 0, 1).float() for i in range(6)}
    images = torch.arange(6.0).view(6, 1, 1, 1).expand(6, 1, 32, 32).contiguous()
    for optimizer in ("lbfgs", "adam"):
        dice = segmentation_probe_dice(_OracleEncoder(onehot), (0.0,) * 3, (1.0,) * 3, images[:4], labels[:4],
                                       images[4:], labels[4:], num_classes=3, steps=150, stride=4,
                                       optimizer=optimizer)
        assert dice > 0.95, optimizer
    with pytest.raises(ValueError, match="optimizer must be"):
        segmentation_probe_dice(_OracleEncoder(onehot), (0.0,) * 3, (1.0,) * 3, images[:4], labels[:4],
                                images[4:], labels[4:], num_classes=3, optimizer="sgd")


class _RandomStages(nn.Module):
    """A fixed random conv and its average pools at strides 4..32: features that do not separate the labels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        y = torch.tanh(self.conv(x))
        return [y] + [F.avg_pool2d(y, s) for s in (4, 8, 16, 32)]


def test_segmentation_probe_returns_the_minimiser_of_its_objective():
    """The default (L-BFGS) probe answers with the minimiser of cross-entropy + wd / 2 |W|^2, found here
    independently by SciPy's L-BFGS-B on the same features; the same answer on 1 and 2 threads."""
    from scipy.optimize import minimize

    from lvmmed_monai.evaluation import _levels

    torch.manual_seed(0)
    enc = _RandomStages().eval()
    x = torch.rand(6, 3, 32, 32)
    y = (torch.rand(6, 32, 32) * 3).long()
    y[:, 8:24, 8:24] = 1  # some structure
    wd = 0.05
    dice = segmentation_probe_dice(enc, (0.5,) * 3, (0.25,) * 3, x[:4], y[:4], x[4:], y[4:], num_classes=3,
                                   stride=4, weight_decay=wd)
    with torch.no_grad():
        ftr, fte = (_levels(enc, (v - 0.5) / 0.25, (8, 8)).double() for v in (x[:4], x[4:]))
        mu, sd = ftr.mean((0, 2, 3), keepdim=True), ftr.std((0, 2, 3), keepdim=True)
        ftr, fte = (ftr - mu) / sd, (fte - mu) / sd
    c = ftr.shape[1]

    def objective(theta):
        t = torch.tensor(theta, requires_grad=True)
        w, b = t[: 3 * c].view(3, c, 1, 1), t[3 * c:]
        out = F.interpolate(F.conv2d(ftr, w, b), size=(32, 32), mode="bilinear", align_corners=False)
        loss = F.cross_entropy(out, y[:4]) + 0.5 * wd * w.pow(2).sum()
        loss.backward()
        return loss.item(), t.grad.numpy()

    theta = minimize(objective, np.zeros(3 * c + 3), jac=True, method="L-BFGS-B", options={"gtol": 1e-10}).x
    w, b = torch.tensor(theta[: 3 * c]).view(3, c, 1, 1), torch.tensor(theta[3 * c:])
    pred = F.interpolate(F.conv2d(fte, w, b), size=(32, 32), mode="bilinear", align_corners=False).argmax(1)
    assert dice == pytest.approx(mean_dice(pred, y[4:], 3), abs=1e-9)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        again = segmentation_probe_dice(enc, (0.5,) * 3, (0.25,) * 3, x[:4], y[:4], x[4:], y[4:], num_classes=3,
                                        stride=4, weight_decay=wd)
    finally:
        torch.set_num_threads(threads)
    assert again == pytest.approx(dice, abs=1e-9)



def _fake_templates(folder) -> None:
    """mricron-data's files in miniature: a 24 x 28 x 30 'brain' (noise) with a 3-lobe AAL map on the same grid,
    a brain-extracted copy, a 0.5 mm version with its own affine and an INIA19 stand-in."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = -10
    brain = rng.random((24, 28, 30)).astype(np.float32)
    aal = np.zeros((24, 28, 30), dtype=np.int16)
    aal[2:12, 2:14, 1:29], aal[12:22, 2:14, 1:29], aal[2:22, 14:26, 1:29] = 1, 2, 3
    better_affine = np.diag([0.5, 0.5, 0.5, 1.0])
    better_affine[:3, 3] = -10
    for name, arr, aff in (("ch2", brain, affine), ("ch2bet", brain * 0.5, affine), ("aal", aal, affine),
                           ("ch2better", rng.random((48, 56, 60)).astype(np.float32), better_affine),
                           ("inia19-t1-brain", rng.random((20, 22, 18)).astype(np.float32), affine)):
        nib.save(nib.Nifti1Image(arr, aff), str(folder / f"{name}.nii.gz"))
    (folder / "aal.nii.txt").write_text("1 Precentral_L 2001\n2 Insula_L 3001\n3 Cuneus_L 5001\n")


def test_prepare_mr_data_writes_disjoint_folders_and_reuses_them(tmp_path):
    from lvmmed_monai.data.atlas import colin27_tasks, prepare_mr_data
    from lvmmed_monai.evaluation import labeled_split

    templates = tmp_path / "templates"
    templates.mkdir()
    _fake_templates(templates)
    tasks = colin27_tasks(templates, image_size=16, per_class=(6, 4))
    assert tasks["names"] == ["frontal", "insula", "occipital"]
    assert not set(tasks["train_z"]) & set(tasks["test_z"])
    # unlabelled: ch2, ch2bet and ch2better at the train slices only, then INIA19 along its 3 axes
    shapes = [v.shape for v in tasks["unlabelled"]]
    n_train = len(tasks["train_z"])
    assert shapes[:3] == [(24, 28, n_train), (24, 28, n_train), (48, 56, n_train)]
    assert shapes[3:] == [(22, 18, 20), (20, 18, 22), (20, 22, 18)]

    paths = prepare_mr_data(tmp_path / "mr", templates, per_class=(6, 4))
    pngs = sorted(paths["unlabelled"].glob("*.png"))
    assert len(pngs) == 3 * n_train + 18 + 20 + 22  # every slice of noise has range >= 0.05
    for split, per in (("train", 6), ("test", 4)):
        folders = sorted(p.name for p in (paths["regions"] / split).iterdir())
        assert folders == ["frontal", "insula", "occipital"]
        assert all(len(list((paths["regions"] / split / f).glob("*.png"))) == per for f in folders)
    assert not (tmp_path / "mr" / ".partial").exists()
    # a second call with the same settings writes nothing
    stamp = pngs[0].stat().st_mtime_ns
    pngs[0].unlink()
    prepare_mr_data(tmp_path / "mr", templates, per_class=(6, 4))
    assert not pngs[0].exists()
    prepare_mr_data(tmp_path / "mr", templates, per_class=(6, 3))  # other settings: rebuilt
    assert pngs[0].exists() and pngs[0].stat().st_mtime_ns != stamp
    assert len(list((paths["regions"] / "test" / "insula").glob("*.png"))) == 3
    # the probes take train/ and test/ as the split, not a shuffle of both
    (xtr, ytr, xte, yte), classes = labeled_split(paths["regions"], 16)
    assert classes == ["frontal", "insula", "occipital"]
    assert ytr.bincount().tolist() == [6, 6, 6] and yte.bincount().tolist() == [3, 3, 3]
    assert xtr.shape == (18, 1, 16, 16)
    import shutil

    shutil.copytree(paths["regions"] / "test" / "insula", paths["regions"] / "test" / "deep_grey")
    with pytest.raises(ValueError, match="same class folders"):
        labeled_split(paths["regions"], 16)


def test_cli_mr_data_reports_the_folders(tmp_path, capsys):
    from lvmmed_monai.cli import main

    templates = tmp_path / "templates"
    templates.mkdir()
    _fake_templates(templates)
    assert main(["mr-data", "--out", str(tmp_path / "mr"), "--templates", str(templates)]) == 0
    out = capsys.readouterr().out
    assert "unlabelled MR slices" in out and "patches of 3 lobes from disjoint slices" in out
    assert (tmp_path / "mr" / "regions" / "train" / "frontal").is_dir()
    assert main(["mr-data", "--out", str(tmp_path / "mr2"), "--templates", str(tmp_path / "none")]) != 0
    assert "ch2.nii.gz not found" in capsys.readouterr().err
