"""Bad inputs as a new user would give them (issue 16): each is refused with its own error type and a message
that names the file or argument and the fix, or, where the workflow skips inputs (pretraining collections), is
skipped with a warning naming the file and the reason. Weights, images and volumes are generated in
``tmp_path``; the segmentation inference runs ``bundles/lvmmed_seg/configs/inference.yaml`` in-process.

Decision (documented in bundles/lvmmed_seg/docs/README.md): the supervised bundles (seg, cls, det, hybrid3d)
*refuse* a NaN/Inf or constant image when it is loaded (``VolumeDataError``), in training, evaluation and
inference alike; predictions already written for earlier inputs are complete, nothing is written for the bad
one. Only pretraining, which already skips unusable files of a collection (``on_bad_data: skip``), skips them
with a warning. Both go through one check, :func:`lvmmed_monai.data.pretrain.image_value_problem`.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from lvmmed_monai import weights as W
from lvmmed_monai.data.pretrain import PretrainDataError, image_value_problem, prepare_slices
from lvmmed_monai.data.segmentation import CheckedLoadImaged
from lvmmed_monai.data.volumes import VolumeDataError
from lvmmed_monai.data.writers import AtomicNibabelWriter
from lvmmed_monai.encoders import load_encoder

REPO = Path(__file__).resolve().parents[1]
SEG_CONFIGS = REPO / "bundles" / "lvmmed_seg" / "configs"
HYBRID_CONFIGS = REPO / "bundles" / "lvmmed_hybrid3d" / "configs"


def _nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array.astype(np.float32), np.eye(4) if affine is None else affine), path)
    return path


# ---------------------------------------------------------------- weights


class _Payload:
    """A pickle that runs code when loaded: writes the file named in ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _nonfinite(value: float, key: str) -> Callable[[dict, Path], Path]:
    def make(state: dict, tmp: Path) -> Path:
        state = dict(state)
        state[key] = state[key].clone()
        state[key].view(-1)[0] = value
        torch.save(state, tmp / "lvmmed_resnet.torch")
        return tmp / "lvmmed_resnet.torch"

    return make


def _code_pickle(zipped: bool) -> Callable[[dict, Path], Path]:
    def make(state: dict, tmp: Path) -> Path:
        path = tmp / "evil.pth"
        if zipped:  # torch.save's zip archive holding a payload beside a tensor
            torch.save({"conv1.weight": torch.zeros(1), "payload": _Payload(tmp / "pwned")}, path)
        else:  # a bare pickle (protocol 5), what the issue reported as "truncated or corrupt"
            path.write_bytes(pickle.dumps({"state_dict": _Payload(tmp / "pwned")}, protocol=5))
        return path

    return make


def _folder(files: tuple[str, ...]) -> Callable[[dict, Path], Path]:
    def make(state: dict, tmp: Path) -> Path:
        folder = tmp / "weights"
        folder.mkdir()
        for name in files:
            (folder / name).write_bytes(b"x")
        (folder / "README.txt").write_text("not a checkpoint")
        return folder

    return make


def _truncated(state: dict, tmp: Path) -> Path:
    path = tmp / "lvmmed_resnet.torch"
    torch.save({k: v for k, v in list(state.items())[:20]}, path)
    path.write_bytes(path.read_bytes()[:5000])
    return path


def _bytes(data: bytes) -> Callable[[dict, Path], Path]:
    def make(state: dict, tmp: Path) -> Path:
        (tmp / "lvmmed_resnet.torch").write_bytes(data)
        return tmp / "lvmmed_resnet.torch"

    return make


def _saved(obj: object) -> Callable[[dict, Path], Path]:
    def make(state: dict, tmp: Path) -> Path:
        torch.save(obj, tmp / "lvmmed_resnet.torch")
        return tmp / "lvmmed_resnet.torch"

    return make


# (case, make(state, tmp) -> path, error type, regexes the message must hold; "{path}" = the path given)
WEIGHT_CASES = [
    ("nan conv1.weight", _nonfinite(float("nan"), "conv1.weight"), W.CheckpointError,
     [r"{path}", r"hold NaN or Inf", r"conv1\.weight", r"check_finite=False"]),
    ("inf running_var", _nonfinite(float("inf"), "layer4.2.bn3.running_var"), W.CheckpointError,
     [r"{path}", r"layer4\.2\.bn3\.running_var", r"check_finite=False"]),
    ("code pickle, bare", _code_pickle(zipped=False), W.CheckpointError,
     [r"refused to load {path}", r"pickled Python objects", r"posix\.system|os\.system", r"weights_only=False"]),
    ("code pickle, torch zip", _code_pickle(zipped=True), W.CheckpointError,
     [r"refused to load {path}", r"pickled Python objects", r"posix\.system|os\.system"]),
    ("empty folder", _folder(()), IsADirectoryError,
     [r"weights {path} is a folder", r"no checkpoint file", r"path of the file itself"]),
    ("folder with one checkpoint", _folder(("model_best.pt",)), IsADirectoryError,
     [r"{path} is a folder", r"one checkpoint: pass {path}/model_best\.pt"]),
    ("folder with two checkpoints", _folder(("a.pth", "b.pth")), IsADirectoryError,
     [r"{path} is a folder", r"2 checkpoints \(a\.pth, b\.pth\)"]),
    # already refused before issue 16; kept in the corpus so they stay so
    ("missing file", lambda state, tmp: tmp / "nope.torch", FileNotFoundError, [r"{path}", r"lvmmed weights list"]),
    ("truncated file", _truncated, W.CheckpointError, [r"{path}", r"truncated or corrupt"]),
    ("empty file", _bytes(b""), W.CheckpointError, [r"{path}", r"truncated or corrupt"]),
    ("text file", _bytes(b"<html>404 not found</html>"), W.CheckpointError, [r"{path}", r"truncated or corrupt"]),
    ("a bare tensor", _saved(torch.zeros(3)), W.CheckpointError, [r"{path} holds a Tensor, not a state dict"]),
    ("another network", _saved({"stem.weight": torch.zeros(2), "head.bias": torch.zeros(2)}),
     W.CheckpointMismatchError, [r"{path} does not match", r"missing \(318\)", r"unexpected \(2\): stem\.weight"]),
]


@pytest.mark.parametrize("case, make, error, messages", WEIGHT_CASES, ids=[c[0] for c in WEIGHT_CASES])
def test_bad_weights_are_refused_naming_the_file_and_the_fix(tmp_path, r50_state, case, make, error, messages):
    path = make(r50_state, tmp_path)
    with pytest.raises(error) as err:
        load_encoder("lvmmed_resnet50", weights=str(path))
    for message in messages:
        assert re.search(message.format(path=re.escape(str(path))), str(err.value)), str(err.value)
    if "pickle" in case:
        assert "truncated" not in str(err.value)  # not sent to download again
        assert not (tmp_path / "pwned").exists()  # the payload never ran


def test_nonfinite_weights_load_with_check_finite_false_and_in_a_state_dict_are_refused_too(tmp_path, r50_state):
    path = _nonfinite(float("nan"), "conv1.weight")(r50_state, tmp_path)
    enc = load_encoder("lvmmed_resnet50", weights=str(path), check_finite=False)
    assert enc.load_report.ok and torch.isnan(enc.conv1.weight).sum() == 1
    state = dict(r50_state, **{"bn1.weight": torch.full((64,), float("inf"))})
    with pytest.raises(W.CheckpointError, match=r"<state dict>: 1 of 320 tensors .*\(bn1\.weight\)"):
        W.read_checkpoint(state)
    assert W.nonfinite_tensors(state) == ["bn1.weight"]


def test_a_folder_is_named_wherever_weights_are_resolved(tmp_path):
    """``resolve_weights`` is what the nnU-Net trainers ($LVMMED_WEIGHTS) and the bundles call first."""
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "lvmmed_resnet.torch").write_bytes(b"x")
    with pytest.raises(IsADirectoryError, match=r"one checkpoint: pass .*ckpt/lvmmed_resnet\.torch"):
        W.resolve_weights(tmp_path / "ckpt")


# ---------------------------------------------------------------- images and volumes: one check


@pytest.mark.parametrize("array, problem", [
    (np.full((4, 5, 3), np.nan, np.float32), "no finite value (all NaN/Inf)"),
    (np.full((4, 5, 3), np.inf, np.float32), "no finite value (all NaN/Inf)"),
    (np.where(np.arange(60).reshape(4, 5, 3) == 7, np.nan, np.arange(60.0).reshape(4, 5, 3)), "1 of 60 values"),
    (np.zeros((4, 5, 3), np.int16), "constant image (every value is 0)"),
    (np.full((4, 5), 7.5), "constant image (every value is 7.5)"),
    (np.zeros((0, 5)), "empty image"),
    (np.arange(20.0).reshape(4, 5), None),
])
def test_image_value_problem(array, problem):
    found = image_value_problem(torch.as_tensor(array))
    assert (found is None) if problem is None else problem in found
    assert image_value_problem(array) == found


@pytest.mark.parametrize("fill, message", [
    (np.nan, "no finite value (all NaN/Inf)"),
    (0.0, "constant image (every value is 0)"),
    ("some-nan", "values are NaN/Inf"),
])
@pytest.mark.parametrize("config", ["lvmmed_seg/configs/train.yaml", "lvmmed_hybrid3d/configs/train_seg.yaml"])
def test_training_images_with_nan_or_constant_values_are_refused_and_labels_may_be_empty(tmp_path, fill, message,
                                                                                         config):
    """The load transforms of the training configs (seg and hybrid 3D; cls and det use the same class)."""
    from monai.bundle import ConfigParser

    volume = np.random.default_rng(0).normal(size=(8, 8, 4))
    if fill == "some-nan":
        volume[1, 2, 3] = np.nan
    else:
        volume[:] = fill
    image = _nifti(tmp_path / "image.nii.gz", volume)
    label = _nifti(tmp_path / "label.nii.gz", np.zeros((8, 8, 4)))  # all background: a valid label
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / config))
    load = parser.get_parsed_content("load_transforms", instantiate=True)[0]
    assert isinstance(load, CheckedLoadImaged)
    with pytest.raises(VolumeDataError, match=f"{image}: .*{message.replace('(', '.').replace(')', '.')}"
                       r".*Remove it from the data"):
        load({"image": str(image), "label": str(label)})
    good = _nifti(tmp_path / "good.nii.gz", np.random.default_rng(1).normal(size=(8, 8, 4)))
    assert load({"image": str(good), "label": str(label)})["image"].shape == (8, 8, 4)


def test_check_values_keys_are_configurable(tmp_path):
    flat = _nifti(tmp_path / "flat.nii.gz", np.zeros((6, 6, 2)))
    assert CheckedLoadImaged("image", image_only=True, check_values=None)({"image": str(flat)})["image"].shape == (
        6, 6, 2)
    with pytest.raises(VolumeDataError, match="flat.nii.gz: constant image"):
        CheckedLoadImaged(["image", "mask"], image_only=True, check_values=["mask"])(
            {"image": str(_nifti(tmp_path / "ok.nii.gz", np.eye(6)[..., None])), "mask": str(flat)})


def test_pretraining_skips_nan_and_constant_files_with_a_warning_naming_them(tmp_path, caplog):
    data = tmp_path / "data"
    _nifti(data / "good.nii.gz", np.random.default_rng(0).random((16, 16, 3)))
    _nifti(data / "nan.nii.gz", np.full((16, 16, 3), np.nan))
    _nifti(data / "zero.nii.gz", np.zeros((16, 16, 3)))
    with caplog.at_level(logging.WARNING):
        index = prepare_slices(data, tmp_path / "cache")
    assert {e["source"] for e in index} == {str(data / "good.nii.gz")}
    messages = [r.getMessage() for r in caplog.records]
    assert any("nan.nii.gz" in m and "no finite value" in m for m in messages)
    assert any("zero.nii.gz" in m and "constant image (every value is 0)" in m for m in messages)
    with pytest.raises(PretrainDataError, match=r"nan\.nii\.gz: no finite value"):
        prepare_slices(data, tmp_path / "cache2", on_error="raise")


# ---------------------------------------------------------------- lvmmed_seg inference


@pytest.fixture(scope="module")
def seg_model(tmp_path_factory) -> Path:
    from lvmmed_monai.networks import segmentation_net_2d

    path = tmp_path_factory.mktemp("seg_model") / "model.pt"
    torch.manual_seed(0)
    torch.save(segmentation_net_2d("lvmmed_resnet50", 1, 3).state_dict(), path)
    return path


def _infer(data: list[Path], out: Path, model: Path) -> None:
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(config_file=str(SEG_CONFIGS / "inference.yaml"), workflow_type="infer",
                              logging_file=False, data=[str(p) for p in data], output_dir=str(out),
                              checkpoint=str(model), num_workers=0, sw_batch_size=8)
    workflow.initialize()
    workflow.run()


@pytest.mark.parametrize("fill, message", [(np.nan, "no finite value (all NaN/Inf)"),
                                           (0.0, "constant image (every value is 0)")])
def test_seg_inference_refuses_nan_and_constant_volumes_naming_the_file(tmp_path, seg_model, fill, message):
    good = _nifti(tmp_path / "in" / "a_good.nii.gz", np.random.default_rng(0).normal(size=(12, 10, 2)))
    bad = _nifti(tmp_path / "in" / "b_bad.nii.gz", np.full((12, 10, 2), fill))
    out = tmp_path / "out"
    with pytest.raises(RuntimeError) as err:  # MONAI's Compose names the transform, our error is its cause
        _infer([good, bad], out, seg_model)
    cause: BaseException | None = err.value
    while cause is not None and not isinstance(cause, VolumeDataError):
        cause = cause.__cause__
    assert cause is not None, err.value
    assert str(cause).startswith(f"{bad}: {message}") and "Remove it from the data" in str(cause)
    assert sorted(p.name for p in out.iterdir()) == ["a_good_seg.nii.gz"]  # complete; nothing for the bad one


def test_seg_inference_keeps_the_shape_affine_and_spacing_of_a_1_x_4000_x_1_volume(tmp_path, seg_model):
    affine = np.array([[0, -0.7, 0, 10.0], [0.9, 0, 0, -5.0], [0, 0, 3.0, 2.0], [0, 0, 0, 1]])
    thin = _nifti(tmp_path / "thin.nii.gz", np.random.default_rng(0).normal(size=(1, 4000, 1)), affine)
    _infer([thin], tmp_path / "out", seg_model)
    pred = nib.load(tmp_path / "out" / "thin_seg.nii.gz")
    assert pred.shape == (1, 4000, 1) and pred.get_data_dtype() == np.uint8
    np.testing.assert_allclose(pred.affine, affine, atol=1e-6)
    np.testing.assert_allclose(pred.header.get_zooms(), (0.9, 0.7, 3.0), atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 4000, 1), (5, 1, 1), (6, 7), (6, 7, 2)])
def test_nifti_writer_keeps_singleton_spatial_axes(tmp_path, shape):
    """Load -> channel first -> save, as the inference configs do: the file has the input's shape."""
    from monai.transforms import EnsureChannelFirst, LoadImage, SaveImage

    image = EnsureChannelFirst()(LoadImage(image_only=True)(_nifti(tmp_path / "x.nii.gz", np.ones(shape))))
    SaveImage(output_dir=tmp_path / "out", output_postfix="seg", resample=False, separate_folder=False,
              print_log=False, writer=AtomicNibabelWriter)(image)
    assert nib.load(tmp_path / "out" / "x_seg.nii.gz").shape == shape
