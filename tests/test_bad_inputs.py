"""Bad inputs as a new user would give them (issue 16): each is refused with its own error type and a message
that names the file or argument and the fix, or, where the workflow skips inputs (pretraining collections), is
skipped with a warning naming the file and the reason. Weights, images and volumes are generated in
``tmp_path``; the segmentation inference runs ``bundles/lvmmed_seg/configs/inference.yaml`` in-process.

Decision (documented in bundles/lvmmed_seg/docs/README.md): the supervised bundles (seg, cls, det, hybrid3d)
*refuse* a NaN/Inf or constant image when it is loaded (``VolumeDataError``), in training, evaluation and
inference alike; predictions already written for earlier inputs are complete, nothing is written for the bad
one. Only pretraining, which already skips unusable files of a collection (``on_bad_data: skip``), skips them
with a warning. Both go through one check, :func:`lvmmed_monai.data.loading.image_value_problem`.
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
from bundle_helpers import causes

from lvmmed_monai import weights as W
from lvmmed_monai.data.loading import CheckedLoadImaged, PretrainDataError, VolumeDataError, image_value_problem
from lvmmed_monai.data.pretrain import prepare_slices
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
def seg_model(module_tmp) -> Path:
    from lvmmed_monai.networks import segmentation_net_2d

    path = module_tmp("seg_model") / "model.pt"
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
    cause = next((c for c in causes(err.value) if isinstance(c, VolumeDataError)), None)
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


# ---------------------------------------------------------------- the `lvmmed weights` command


def _cli(capsys, *argv: str) -> tuple[int, str]:
    from lvmmed_monai.cli import main

    code = main(list(argv))
    return code, capsys.readouterr().err


def test_cli_inspect_and_convert_refuse_bad_files_naming_them_and_write_nothing(tmp_path, r50_state, capsys):
    (tmp_path / "folder").mkdir()
    nan = _nonfinite(float("nan"), "conv1.weight")(r50_state, tmp_path)
    torch.save({"stem.weight": torch.zeros(2)}, tmp_path / "other.pth")
    out = tmp_path / "out"
    for argv, messages in [
        (["inspect", str(tmp_path / "folder")], [f"{tmp_path / 'folder'} is a folder", "path of the file itself"]),
        (["inspect", str(tmp_path / "nope.pth")], [f"not found: {tmp_path / 'nope.pth'}", "local checkpoint"]),
        (["convert", str(nan), str(out / "x.pth"), "--to", "timm_samvit_b"], [str(nan), "check_finite=False"]),
        (["convert", str(tmp_path / "other.pth"), str(out / "x.pth"), "--to", "sam_vit_b"],
         ["no conversion from layout unknown to sam_vit_b",
          "known: ['sam_vit_b', 'timm_samvit_b', 'torchvision_resnet50']"]),
    ]:
        code, err = _cli(capsys, "weights", *argv)
        assert code == 2 and err.startswith("lvmmed: error: "), err  # a message, not a traceback
        assert all(m in err for m in messages), err
    assert not out.exists()


def test_cli_fetch_fails_fast_with_a_message_and_leaves_no_file(tmp_path, capsys):
    """No network here: a missing ``file://`` path, an unroutable address (connect timeout 1 s) and a wrong
    ``--sha256`` each fail within seconds, naming the URL and the fix; the cache folder stays empty."""
    import time

    cache = tmp_path / "cache"
    good = tmp_path / "w.pth"
    torch.save({"a": torch.zeros(3)}, good)
    for source, extra, messages in [
        ((tmp_path / "absent.pth").as_uri(), [], ["could not download file://", "absent.pth", "local path"]),
        ("http://10.255.255.1:9/w.pth", ["--timeout", "1"], ["could not download http://10.255.255.1:9/w.pth",
                                                            "Check the URL and the network"]),
        (good.as_uri(), ["--sha256", "0" * 64], [f"sha256 of {good.as_uri()} is", "file discarded",
                                                 "--sha256 value"]),
    ]:
        start = time.monotonic()
        code, err = _cli(capsys, "weights", "fetch", source, "--cache-dir", str(cache), *extra)
        assert time.monotonic() - start < 10 and code == 2, err
        assert all(m in err for m in messages), err
        assert not cache.exists() or list(cache.iterdir()) == []  # no file, no .part
    with pytest.raises(W.DownloadError, match="no answer within 0.5 s|could not download"):
        W.download("http://10.255.255.1:9/w.pth", tmp_path / "x.pth", timeout=0.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "w.pth"] or not (tmp_path / "x.pth").exists()


# ---------------------------------------------------------------- bundle configs: data problems


def _png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8), mode).save(path)
    return path


def _pairs(root: Path, image: Callable[[Path], Path], label: Callable[[Path], Path], n: int = 2) -> Path:
    """``root/images`` + ``root/labels`` with ``n`` cases written by ``image(path)`` / ``label(path)``."""
    for i in range(n):
        image(root / "images" / f"case{i}")
        label(root / "labels" / f"case{i}")
    return root


def _nii(array: np.ndarray) -> Callable[[Path], Path]:
    return lambda stem: _nifti(stem.with_suffix(".nii.gz"), array)


def _pngs(array: np.ndarray, mode: str | None = None) -> Callable[[Path], Path]:
    return lambda stem: _png(stem.with_suffix(".png"), array, mode)


def _text(stem: Path) -> Path:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".txt").write_text("not an image")
    return stem.with_suffix(".txt")


_RNG = np.random.default_rng(0)
_VOL = _RNG.normal(size=(8, 8, 4))
_LAB = np.zeros((8, 8, 4))
_BAD_LAB = np.where(np.arange(256).reshape(8, 8, 4) == 9, 5, 0)

# (case, config, folder writer(root), message parts); the config's data checks run in `initialize`, before
# anything is written
DATA_CASES = [
    ("empty images/ and labels/", "train.yaml",
     lambda r: ((r / "images").mkdir(parents=True), (r / "labels").mkdir()) and r, ["no image files in", "supported"]),
    ("non-image files", "train.yaml", lambda r: _pairs(r, _text, _text), ["no image files in", "supported: ['.nii'"]),
    ("non-image files, inference", "inference.yaml", lambda r: _pairs(r, _text, _text) / "images",
     ["no image files found under", "supported: 2D"]),
    ("4D volume", "train.yaml", lambda r: _pairs(r, _nii(_RNG.normal(size=(8, 8, 4, 2))), _nii(np.zeros((8, 8, 4, 2)))),
     ["case0.nii.gz: array of shape [8, 8, 4, 2]", "split multi-channel or 4D files"]),
    ("4D volume, inference", "inference.yaml", lambda r: _pairs(r, _nii(_RNG.normal(size=(8, 8, 4, 2))), _text) /
     "images", ["case0.nii.gz: array of shape [8, 8, 4, 2]", "split multi-channel or 4D files"]),
    ("2-channel (grey + alpha) PNG", "train.yaml",
     lambda r: _pairs(r, _pngs(_RNG.integers(0, 255, (16, 16, 2)), "LA"), _pngs(np.zeros((16, 16)))),
     ["case0.png: a 2-channel image (grey + alpha)", "convert('L')"]),
    ("2-channel PNG, inference", "inference.yaml",
     lambda r: _pairs(r, _pngs(_RNG.integers(0, 255, (16, 16, 2)), "LA"), _text) / "images",
     ["case0.png: a 2-channel image", "drop the alpha"]),
    ("labels outside num_classes", "evaluate.yaml", lambda r: _pairs(r, _nii(_VOL), _nii(_BAD_LAB)),
     ["case0.nii.gz holds values [5.0] outside the classes 0..2", "set --num_classes 6"]),
    ("image / label shape mismatch", "train.yaml", lambda r: _pairs(r, _nii(_VOL), _nii(np.zeros((8, 8, 3)))),
     ["case0.nii.gz has shape [8, 8, 3] but its image", "has [8, 8, 4]"]),
]


@pytest.mark.parametrize("case, config, make, messages", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_seg_bundle_refuses_bad_data_before_writing_anything(tmp_path, case, config, make, messages):
    """``lvmmed_seg`` train / evaluate / inference: the datalist each config checks in ``initialize``."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(SEG_CONFIGS / config))
    out = tmp_path / "out"
    parser.update({"data": str(make(tmp_path / "data")), "output_dir": str(out)})
    with pytest.raises(Exception) as err:
        parser.get_parsed_content("datalists" if config == "train.yaml" else "datalist")
    cause = next((c for c in causes(err.value) if isinstance(c, VolumeDataError)), None)
    assert cause is not None, err.value
    assert all(m in str(cause) for m in messages), str(cause)
    assert not out.exists()


def _load_and_augment(image: Path, label: Path) -> list[dict]:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(SEG_CONFIGS / "train.yaml"))
    parser.update({"patch_size": [16, 16], "slices_per_volume": 1})
    return parser.get_parsed_content("train#preprocessing")({"image": str(image), "label": str(label)})


def test_seg_training_truncated_and_1x1_images_are_refused_when_loaded_extreme_aspect_is_padded(tmp_path):
    """Headers read, so these pass the datalist check; the training load refuses the truncated NIfTI (voxels
    cut off) and a 1 x 1 image (one value: constant); a 2 x 300 image is padded and cropped to the patch."""
    label = _nifti(tmp_path / "label.nii.gz", np.zeros((40, 40, 30)))
    whole = _nifti(tmp_path / "whole.nii.gz", _RNG.normal(size=(40, 40, 30))).read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(RuntimeError) as err:
        _load_and_augment(tmp_path / "cut.nii.gz", label)
    assert f"{tmp_path / 'cut.nii.gz'}" in str(err.value.__cause__) and "remove or re-export" in str(
        err.value.__cause__)
    one = _png(tmp_path / "one.png", np.array([[7]]))
    with pytest.raises(RuntimeError) as err:
        _load_and_augment(one, _png(tmp_path / "one_label.png", np.zeros((1, 1))))
    assert f"{one}: constant image (every value is 7)" in str(err.value.__cause__)
    wide = _png(tmp_path / "wide.png", _RNG.integers(0, 255, (2, 300)))
    [sample] = _load_and_augment(wide, _png(tmp_path / "wide_label.png", np.zeros((2, 300))))
    assert sample["image"].shape == sample["label"].shape == (1, 16, 16)


# ---------------------------------------------------------------- pretraining knobs


def test_pretraining_refuses_a_wrong_typed_image_size_and_a_batch_of_partial_graphs():
    from lvmmed_monai.data.sampling import GlobalBatchSampler
    from lvmmed_monai.engines import build_encoder

    with pytest.raises(TypeError, match=r"image_size must be an integer >= 1, got 'abc': pass a number, e\.g\. "
                                        r"--image_size 224"):
        build_encoder("lvmmed_resnet50", "abc")
    with pytest.raises(ValueError, match=r"batch_size 12 must be a positive multiple of graph_size 8 x 1 process"
                                         r".*set --batch_size 8"):
        GlobalBatchSampler(range(64), 12, num_replicas=1, rank=0, graph_size=8)
    with pytest.raises(ValueError, match=r"batch_size 16 .* graph_size 8 x 4 process\(es\) = 32.*--batch_size 32"):
        GlobalBatchSampler(range(64), 16, num_replicas=4, rank=0, graph_size=8)
    with pytest.raises(TypeError, match=r"batch_size must be an integer, got 'abc'"):
        GlobalBatchSampler(range(64), "abc", num_replicas=1, rank=0, graph_size=8)
    assert len(GlobalBatchSampler(range(64), 16, num_replicas=1, rank=0, graph_size=8)) == 64


def test_pretrain_config_wires_the_batch_check_before_the_run():
    """train.yaml gives the sampler its graph_size (the check above runs when the sampler is built)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / "lvmmed_pretrain" / "configs" / "train.yaml"))
    assert parser["train"]["sampler"]["graph_size"] == "@graph_size"


# ---------------------------------------------------------------- nnU-Net trainers: $LVMMED_WEIGHTS


@pytest.mark.parametrize("trainer, weights, error, messages", [
    ("LVMMedTrainer", None, RuntimeError, ["set LVMMED_WEIGHTS=/path/to/checkpoint", "_scratch"]),
    ("LVMMedTrainer", "absent.torch", FileNotFoundError, ["absent.torch", "lvmmed weights list"]),
    ("LVMMedTrainer", "vit", W.CheckpointError, ["holds sam_vit_b weights; LVMMedTrainer takes torchvision_resnet50",
                                                 "use -tr LVMMedViTTrainer"]),
    ("LVMMedViTTrainer", "r50", W.CheckpointError, ["holds torchvision_resnet50 weights; LVMMedViTTrainer takes "
                                                    "sam_vit_b or timm_samvit_b", "use -tr LVMMedTrainer"]),
    ("LVMMedTrainer", "other", W.CheckpointError, ["holds unknown-layout weights", "lvmmed weights inspect"]),
    ("LVMMedTrainer", "folder", IsADirectoryError, ["is a folder", "one checkpoint: pass"]),
])
def test_nnunet_trainers_check_lvmmed_weights_when_created(tmp_path, monkeypatch, trainer, weights, error, messages):
    """``_weights_from_env`` is what the trainers' ``__init__`` runs first, before nnU-Net writes anything. The
    checkpoints hold each layout's key names and defining shapes (the layout check reads no more)."""
    from nnunet_plugin import lvmmed_trainers

    r50_keys = ["layer1.0.conv3.weight", "layer3.5.conv1.weight"]
    r50_file = str(tmp_path / "lvmmed_resnet.torch")
    torch.save({"conv1.weight": torch.zeros(64, 3, 1, 1), **{k: torch.zeros(1) for k in r50_keys}}, r50_file)
    vit_keys = ["blocks.11.attn.qkv.weight", "blocks.0.mlp.lin1.weight"]
    vit_file = str(tmp_path / "lvmmed_vit.pth")
    torch.save({"patch_embed.proj.weight": torch.zeros(768, 3, 1, 1), **{k: torch.zeros(1) for k in vit_keys}},
               vit_file)
    (tmp_path / "folder").mkdir()
    torch.save({}, tmp_path / "folder" / "lvmmed_resnet.torch")
    torch.save({"stem.weight": torch.zeros(2)}, tmp_path / "other.pth")
    path = {None: None, "vit": vit_file, "r50": r50_file, "other": tmp_path / "other.pth"}.get(
        weights, tmp_path / str(weights))
    if path is None:
        monkeypatch.delenv("LVMMED_WEIGHTS", raising=False)
    else:
        monkeypatch.setenv("LVMMED_WEIGHTS", str(path))
    with pytest.raises(error) as err:
        getattr(lvmmed_trainers, trainer)._weights_from_env()
    assert all(m in str(err.value) for m in messages), str(err.value)
    monkeypatch.setenv("LVMMED_WEIGHTS", vit_file if "ViT" in trainer else r50_file)
    assert getattr(lvmmed_trainers, trainer)._weights_from_env() == (vit_file if "ViT" in trainer else r50_file)


# ---------------------------------------------------------------- solve_qap and LVMMedLoss


def _qap_k() -> torch.Tensor:
    k = torch.randn(2, 9, 9)
    return k + k.transpose(1, 2)


@pytest.mark.parametrize("make, n, messages", [
    (lambda: _qap_k().fill_(float("nan")), 3, ["K contains NaN or inf", "check the features"]),
    (lambda: _qap_k(), 4, ["K has 9 pairings per problem but n*n = 16 for n = 4"]),
    (lambda: _qap_k()[0], 3, ["K must be a batch of square matrices (G, n*n, n*n), got (9, 9)"]),
    (lambda: torch.randn(2, 9, 9), 3, ["K must be symmetric", "pass (K + K^T) / 2"]),
    (lambda: _qap_k().long(), 3, ["K must be a floating-point tensor"]),
], ids=["nan", "wrong n", "unbatched", "asymmetric", "integer"])
def test_solve_qap_refuses_bad_affinities(make, n, messages):
    from lvmmed_monai.ssl.matching import solve_qap

    with pytest.raises(ValueError) as err:
        solve_qap(make(), n)
    assert all(m in str(err.value) for m in messages), str(err.value)


def test_solve_qap_on_degenerate_affinities_returns_permutations():
    from lvmmed_monai.ssl.matching import solve_qap

    for k in (torch.zeros(2, 9, 9), torch.ones(2, 9, 9)):  # every matching ties
        x = solve_qap(k, 3)
        assert torch.equal(x.sum(1), torch.ones(2, 3)) and torch.equal(x.sum(2), torch.ones(2, 3))


def _loss() -> torch.nn.Module:
    from lvmmed_monai.ssl import LVMMedLoss

    return LVMMedLoss(in_dim=16, proj_dim=8, projector_hidden_dim=16, gcn_dim=8, k=2, graph_size=4)


@pytest.mark.parametrize("shapes, poison, messages", [
    (((8, 16, 3, 3), (8, 16, 3, 3)), "nan", ["bad LVMMedLoss input: ['feats_s']", "check the input images"]),
    (((6, 16, 3, 3), (6, 16, 3, 3)), None, ["batch size N=6 must be a positive multiple of graph_size=4"]),
    (((8, 15, 3, 3), (8, 15, 3, 3)), None, ["feats_s must be encoder maps (N, D=16, R, S), got (8, 15, 3, 3)"]),
    (((8, 16, 3, 3), (4, 16, 3, 3)), None, ["the two views hold 8 and 4 images; they must be paired"]),
    (((8, 16, 3, 3), (8, 16, 3, 3)), "coords", ["bad LVMMedLoss input: ['coords_s range']", "outside [0, 1]"]),
], ids=["nan", "partial graph", "wrong D", "unpaired", "coords outside"])
def test_lvmmed_loss_refuses_bad_inputs(shapes, poison, messages):
    fs, ft = torch.randn(shapes[0]), torch.randn(shapes[1])
    cs, ct = torch.rand(shapes[0][0], 2, 3, 3), torch.rand(shapes[1][0], 2, 3, 3)
    if poison == "nan":
        fs[0, 0, 0, 0] = float("nan")
    if poison == "coords":
        cs[0] += 2
    with pytest.raises(ValueError) as err:
        _loss()(fs, ft, cs, ct)
    assert all(m in str(err.value) for m in messages), str(err.value)


@pytest.mark.parametrize("degenerate", ["identical views", "identical images", "all zero"])
def test_lvmmed_loss_on_degenerate_identical_inputs_has_finite_loss_and_gradients(degenerate):
    x, c = torch.randn(8, 16, 3, 3), torch.rand(8, 2, 3, 3)
    if degenerate == "identical images":
        x, c = x[:1].expand(8, -1, -1, -1).clone(), c[:1].expand(8, -1, -1, -1).clone()
    if degenerate == "all zero":
        x = torch.zeros_like(x)
    fs, ft = x.clone().requires_grad_(), x.clone().requires_grad_()
    crit = _loss()
    loss = crit(fs, ft, c, c.clone()).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = [fs.grad, ft.grad] + [p.grad for p in crit.parameters() if p.grad is not None]
    assert len(grads) > 2 and all(torch.isfinite(g).all() for g in grads)
