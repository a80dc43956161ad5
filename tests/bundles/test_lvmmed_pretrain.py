"""The lvmmed_pretrain bundle end to end on tiny settings (CPU; metadata and the model zoo's steps:
test_model_zoo.py): a 2-iteration CLI run and its outputs, kill + resume, 2-process DDP vs 1 process, a
bad-data failure and the evaluation config."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_helpers import ENV
from bundle_helpers import scalars as _scalars
from PIL import Image

from lvmmed_monai import load_encoder
from lvmmed_monai.demo.phantoms import _chest_xray, torso_ct

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundles" / "lvmmed_pretrain"
TRAIN = str(BUNDLE / "configs" / "train.yaml")
MULTI = str(BUNDLE / "configs" / "multi_gpu_train.yaml")
BIN = Path(sys.executable).parent
CKPT_KEYS = {"encoder", "criterion", "optimizer", "lr_scheduler", "trainer", "grad_scaler", "rng"}


@pytest.fixture(scope="module")
def tiny(module_tmp) -> dict:
    """A tiny mixed collection (2 NIfTI volumes + 12 PNGs, about 30 slices) and overrides for tiny runs."""
    root = module_tmp("tiny")
    rng = np.random.default_rng(0)
    (root / "data" / "ct").mkdir(parents=True)
    (root / "data" / "xr").mkdir(parents=True)
    for i in range(2):
        vol = torso_ct(rng, shape=(48, 48, 9)).astype(np.int16)
        nib.save(nib.Nifti1Image(vol, np.eye(4)), root / "data" / "ct" / f"v{i}.nii.gz")
    for i in range(12):
        Image.fromarray((_chest_xray(rng, 64) * 255).astype(np.uint8)).save(root / "data" / "xr" / f"x{i}.png")
    return {"root": root, "overrides": {
        "data": str(root / "data"), "cache_dir": str(root / "cache"), "image_size": 32, "batch_size": 16,
        "graph_size": 8, "k": 3, "gamma": 4, "progress_bar": False, "num_workers": 0, "log_every": 1,
        "first_order_warmup": 0, "noise_scale": 1.0}}  # the paper's objective from the first iteration


def _cli(overrides: dict) -> list[str]:
    args = []
    for key, value in overrides.items():
        args += [f"--{key}", json.dumps(value) if isinstance(value, (list, dict)) else str(value)]
    return args


def _run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True,
        encoding="utf-8", errors="replace", env=ENV, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def two_iterations(tiny) -> Path:
    """``python -m monai.bundle run`` for 2 iterations (32 samples, batch 16), a checkpoint every iteration."""
    out = tiny["root"] / "run2"
    over = {**tiny["overrides"], "output_dir": str(out), "max_epochs": 1, "samples_per_epoch": 32,
            "ckpt_interval": 1}
    proc = _run([str(BIN / "python"), "-m", "monai.bundle", "run", "--config_file", TRAIN, *_cli(over)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_two_iteration_run_writes_encoder_and_full_checkpoint(two_iterations):
    out = two_iterations
    exported = out / "models" / "lvmmed_resnet.torch"
    plan = json.loads((out / "models" / "adaptation_plan.json").read_text())
    assert plan["weights_layout"] == "torchvision_resnet50" and plan["input_patch_size"] == [32, 32]
    final = torch.load(out / "checkpoints" / "checkpoint_final_iteration=2.pt", weights_only=True)
    first = torch.load(out / "checkpoints" / "checkpoint_iteration=1.pt", weights_only=True)
    assert set(final) == CKPT_KEYS and final["trainer"]["iteration"] == 2
    assert {"projector.0.weight", "gcn.layers.0.weight"} <= set(final["criterion"])
    encoder = load_encoder("lvmmed_resnet50", weights=exported)  # strict by default
    assert encoder.load_report.ok
    state = encoder.state_dict()
    assert all(torch.equal(state[k], final["encoder"][k]) for k in state)  # the export is the trained encoder
    assert not torch.equal(first["encoder"]["layer4.2.conv3.weight"], final["encoder"]["layer4.2.conv3.weight"])
    # train.yaml's frozen_stages (1 for the ResNet-50): the stem and layer1 keep weights and BatchNorm statistics
    frozen = [k for k in final["encoder"] if k.split(".")[0] in ("conv1", "bn1", "layer1")]
    assert len(frozen) == 66 and all(torch.equal(first["encoder"][k], final["encoder"][k]) for k in frozen)
    assert not torch.equal(first["encoder"]["layer2.0.bn1.running_mean"], final["encoder"]["layer2.0.bn1.running_mean"])
    loss = _scalars(out / "logs", "loss")
    assert sorted(loss) == [1, 2] and all(0 <= v <= 2 * 8 for v in loss.values())
    assert _scalars(out / "logs", "epoch_loss") == {1: pytest.approx((loss[1] + loss[2]) / 2)}  # epoch means
    accuracy = _scalars(out / "logs", "accuracy")
    assert _scalars(out / "logs", "epoch_accuracy") == {1: pytest.approx((accuracy[1] + accuracy[2]) / 2)}
    assert 0 <= _scalars(out / "logs", "epoch_retrieval_accuracy")[1] <= 1
    assert _scalars(out / "logs", "lr")[1] == pytest.approx(2e-3)  # the paper's Adam lr, train.yaml's default


def test_evaluate_config_prints_pretrained_and_random_side_by_side(two_iterations):
    proc = _run([str(BIN / "python"), "-m", "monai.bundle", "run", "--config_file",
                 str(BUNDLE / "configs" / "evaluate.yaml"), "--output_dir", str(two_iterations),
                 "--image_size", "32", "--num_train", "24", "--num_test", "24", "--knn_k", "3"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = dict(re.findall(r"^(pretrained|random init)\s+([0-9.]+\s+[0-9.]+)\s*$", proc.stdout, re.M))
    assert set(rows) == {"pretrained", "random init"}
    assert all(0.0 <= float(v) <= 1.0 for row in rows.values() for v in row.split())


def _workflow(tiny: dict, out: Path, record: Path, kill_at: int = 0, **extra) -> subprocess.CompletedProcess:
    over = {**tiny["overrides"], "output_dir": str(out), "max_epochs": 2, "samples_per_epoch": 48,
            "ckpt_interval": 2, **extra}
    helper = str(Path(__file__).with_name("_run_workflow.py"))
    return _run([str(BIN / "python"), helper, TRAIN, str(record), str(kill_at), json.dumps(over)])


def _records(path: Path) -> dict[int, dict]:
    return {r["iteration"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_killed_run_resumed_from_latest_checkpoint_repeats_the_uninterrupted_losses(tiny, tmp_path):
    # 2 epochs x 3 iterations; checkpoints at 2, 4, 6; SIGKILL after iteration 5 -> resume from 4, mid-epoch 2
    full = _workflow(tiny, tmp_path / "full", tmp_path / "full.jsonl")
    assert full.returncode == 0, full.stderr[-3000:]
    killed = _workflow(tiny, tmp_path / "cut", tmp_path / "cut.jsonl", kill_at=5)
    assert killed.returncode == -9, killed.stderr[-3000:]
    ckpts = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").glob("*.pt"))
    assert ckpts == ["checkpoint_iteration=2.pt", "checkpoint_iteration=4.pt"]
    resumed = _workflow(tiny, tmp_path / "cut", tmp_path / "resumed.jsonl", resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ref, cut, res = (_records(tmp_path / f"{n}.jsonl") for n in ("full", "cut", "resumed"))
    assert sorted(ref) == [1, 2, 3, 4, 5, 6] and sorted(cut) == [1, 2, 3, 4, 5] and sorted(res) == [5, 6]
    for it in (5, 6):  # exact: same data, views, Gumbel noise, weights, Adam and lr-schedule state
        for key in ("loss", "accuracy", "objective", "identity_objective", "grad_norm", "lr"):
            assert res[it][key] == ref[it][key], (it, key, res[it][key], ref[it][key])
    assert ref[6]["lr"] == pytest.approx(2e-3 / 16)  # halved four times over the 6 iterations
    a = load_encoder("lvmmed_resnet50", weights=tmp_path / "full" / "models" / "lvmmed_resnet.torch").state_dict()
    b = load_encoder("lvmmed_resnet50", weights=tmp_path / "cut" / "models" / "lvmmed_resnet.torch").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def _two_nodes_on_localhost(args: list[str], timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """``torchrun --nnodes 2 --nproc_per_node 1`` twice on this machine, meeting through c10d rendezvous."""
    port = _free_port()
    launch = [str(BIN / "torchrun"), "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
              "--rdzv_endpoint", f"localhost:{port}", "--rdzv_id", "lvmmed-test", "--max_restarts", "0"]
    procs = [subprocess.Popen([*launch, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8",
                              errors="replace", env=ENV, cwd=REPO) for _ in range(2)]
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return out


@pytest.fixture(scope="module")
def ddp_runs(tiny) -> dict[str, Path]:
    """The same 3 iterations on 1 process, on 2 processes of one node (--standalone) and on 2 nodes of 1 process
    each (c10d rendezvous on localhost), Gumbel noise on."""
    root = tiny["root"] / "ddp"
    over = {**tiny["overrides"], "batch_size": 32, "graph_size": 16, "k": 5, "gumbel": True, "max_epochs": 1,
            "samples_per_epoch": 96, "ckpt_interval": 100, "lr": 1e-7}
    one = _run([str(BIN / "python"), "-m", "monai.bundle", "run", "--config_file", TRAIN,
                *_cli({**over, "output_dir": str(root / "one")})])
    assert one.returncode == 0, one.stderr[-3000:]
    bundle = ["-m", "monai.bundle", "run", "--config_file", f"['{TRAIN}','{MULTI}']"]
    two = _run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", *bundle,
                *_cli({**over, "output_dir": str(root / "two")})])
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    for node in _two_nodes_on_localhost([*bundle, *_cli({**over, "output_dir": str(root / "nodes")})]):
        assert node.returncode == 0, node.stdout[-2000:] + node.stderr[-3000:]
    return {name: root / name for name in ("one", "two", "nodes")}


@pytest.mark.parametrize("launch", ["two", "nodes"])
def test_two_process_ddp_with_gumbel_noise_equals_one_process_on_the_global_batch(ddp_runs, launch):
    """Global batch 32 = 2 graphs of 16; DDP gives each of 2 gloo processes one graph, 3 iterations, with the
    paper's Gumbel noise on (scale 1, no warm-up): each graph's noise is keyed by its global index
    (NoiseKey), so process 1 draws for its graph exactly what the single process draws for graph 2. The
    processes run on one node (``two``) or as two single-process nodes (``nodes``, torchrun --nnodes 2).

    The backward of a randomly initialised ResNet-50 is chaotic
    in float32: a 1e-6 relative change of its input changes input gradients by ~2%, and float32 vs float64
    differ as much; so gradients can only agree to ~1% and, after an Adam step (which moves every weight by
    ~lr whatever its gradient's size), weights by ~lr. With lr 1e-7 the three iterations see the same
    features up to rounding. Tolerances: losses, accuracies, Hamming distances equal; solver objectives
    within 1e-4 relative; gradient norm within 2e-2 relative (a wrong IMLE lambda scaling or unsynchronised
    BatchNorm would change it by ~2x / change the objectives); exported weights within 1e-6 + 1e-5 relative,
    BatchNorm running statistics within 1e-5 + 1e-3 relative (float64 sums on 2 processes vs PyTorch's
    float32 kernel, for channels of near-zero variance)."""
    logs1, logs2 = ddp_runs["one"] / "logs", ddp_runs[launch] / "logs"
    for tag in ("loss", "accuracy", "hamming"):
        assert _scalars(logs2, tag) == _scalars(logs1, tag), tag
    for tag, rel in (("objective", 1e-4), ("identity_objective", 1e-4), ("grad_norm", 2e-2)):
        s1, s2 = _scalars(logs1, tag), _scalars(logs2, tag)
        assert sorted(s1) == sorted(s2) == [1, 2, 3]
        for step in s1:
            assert s2[step] == pytest.approx(s1[step], rel=rel), (tag, step, s1, s2)
    a = load_encoder("lvmmed_resnet50", weights=ddp_runs["one"] / "models" / "lvmmed_resnet.torch").state_dict()
    b = load_encoder("lvmmed_resnet50", weights=ddp_runs[launch] / "models" / "lvmmed_resnet.torch").state_dict()
    for key in a:  # weights move <= ~lr per step; BatchNorm running statistics follow the batch statistics
        tol = {"rtol": 1e-3, "atol": 1e-5} if "running_" in key else {"rtol": 1e-5, "atol": 1e-6}
        torch.testing.assert_close(b[key], a[key], **tol)


def test_bad_file_with_on_bad_data_raise_stops_with_a_clear_message(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray((_chest_xray(np.random.default_rng(0), 64) * 255).astype(np.uint8)).save(data / "ok.png")
    (data / "broken.nii.gz").write_bytes(b"\x00not a volume" * 20)
    proc = _run([str(BIN / "python"), "-m", "monai.bundle", "run", "--config_file", TRAIN, "--data", str(data),
                 "--output_dir", str(tmp_path / "out"), "--on_bad_data", "raise", "--progress_bar", "false"])
    assert proc.returncode != 0
    assert re.search(r"PretrainDataError: .*broken\.nii\.gz: unreadable", proc.stderr), proc.stderr[-3000:]


def test_first_order_warmup_switches_by_iteration_and_on_resume():
    """Iterations 1..N solve the noise-free LAP (per-iteration overrides in engine.state), later ones the
    configured objective; a run resumed past the warm-up (engine state restored, as CheckpointLoader does)
    starts with the configured objective; the criterion itself is never changed."""
    from ignite.engine import Engine, Events

    from lvmmed_monai.engines import FirstOrderWarmup
    from lvmmed_monai.ssl import LVMMedLoss

    crit = LVMMedLoss(in_dim=8, graph_size=4, k=2, noise_scale=0.5)
    seen = []
    engine = Engine(lambda e, b: seen.append((e.state.iteration, e.state.loss_overrides)))
    FirstOrderWarmup(crit, iterations=3).attach(engine)
    engine.run(range(5), max_epochs=1)
    warm = {"second_order": False, "noise_scale": 0.0}
    assert seen == [(1, warm), (2, warm), (3, warm), (4, {}), (5, {})]
    assert (crit.second_order, crit.noise_scale) == (True, 0.5)

    resumed, seen2 = Engine(lambda e, b: seen2.append((e.state.iteration, e.state.loss_overrides))), []
    FirstOrderWarmup(crit, iterations=3).attach(resumed)

    @resumed.on(Events.STARTED)
    def _restore(engine):  # what a checkpoint restore does: the engine continues from iteration 4
        engine.state.iteration, engine.state.epoch = 4, 1

    resumed.run(range(6), max_epochs=2)
    assert seen2[0] == (5, {}) and all(over == {} for _, over in seen2)
    with pytest.raises(ValueError, match="iterations"):
        FirstOrderWarmup(crit, iterations=-1)


PAPER = str(BUNDLE / "configs" / "paper.yaml")


def test_paper_preset_holds_the_papers_values_and_runs_two_iterations_at_a_tiny_size(tiny, tmp_path):
    """configs/paper.yaml over train.yaml: the paper's method values (Sec. 4.1, App. A), init weights required;
    2 iterations with only the sizes overridden (32 px, batch 16 = one graph of 16, 2 iterations)."""
    from monai.bundle import ConfigParser
    from torchvision.models import resnet50

    parser = ConfigParser()
    parser.read_config([TRAIN, PAPER])
    method = {k: parser[k] for k in ("image_size", "batch_size", "graph_size", "k", "alpha", "lam", "noise_scale",
                                     "first_order_warmup", "edge_form", "gcn_form", "local_crops", "max_epochs",
                                     "lr", "lr_halvings", "imle_step", "views", "frozen_stages")}
    assert method == {"image_size": 224, "batch_size": 3072, "graph_size": 16, "k": 5, "alpha": 0.8, "lam": 80.0,
                      "noise_scale": 1.0, "first_order_warmup": 0, "edge_form": "paper", "gcn_form": "paper",
                      "local_crops": 6, "max_epochs": 100, "lr": 0.002, "lr_halvings": 4, "imle_step": "per_graph",
                      "views": {}, "frozen_stages": -1}
    assert 3072 % (16 * 16) == 0 and 3200 % (16 * 16) != 0  # whole graphs on each of 16 processes
    configs = f"['{TRAIN}','{PAPER}']"
    sizes = {"data": tiny["overrides"]["data"], "cache_dir": tiny["overrides"]["cache_dir"], "image_size": 32,
             "batch_size": 16, "max_epochs": 1, "samples_per_epoch": 32, "num_workers": 0, "progress_bar": False,
             "probe_interval": 0, "output_dir": str(tmp_path / "paper")}
    cmd = [str(BIN / "python"), "-m", "monai.bundle", "run", "--config_file", configs, *_cli(sizes)]
    proc = _run(cmd)
    assert proc.returncode != 0 and "init_weights has no default" in proc.stderr, proc.stderr[-2000:]
    weights = tmp_path / "resnet50-imagenet-layout.pth"  # generated weights in torchvision's (ImageNet) layout
    torch.manual_seed(0)
    torch.save(resnet50().state_dict(), weights)
    proc = _run([*cmd, "--init_weights", str(weights)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    final = torch.load(tmp_path / "paper" / "checkpoints" / "checkpoint_final_iteration=2.pt", weights_only=True)
    assert final["trainer"]["iteration"] == 2
    loss = _scalars(tmp_path / "paper" / "logs", "loss")
    assert sorted(loss) == [1, 2] and all(0 <= v <= 2 * 16 for v in loss.values())
    # the run started from the given weights: the stem moved from them by at most 2 Adam steps of lr 2e-3
    start = torch.load(weights, weights_only=True)["conv1.weight"]
    assert (final["encoder"]["conv1.weight"] - start).abs().max() <= 2 * 2e-3 + 1e-6
