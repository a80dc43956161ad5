"""The user docs hold: relative links resolve, docs/python_api.md's code blocks run as written, and the figure
script's plotting functions turn a tiny generated TensorBoard log and volume into PNGs."""

from __future__ import annotations

import importlib.util
import re
import tempfile
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
MARKDOWN = [*sorted(DOCS.glob("*.md")), REPO / "README.md"]
FENCE = re.compile(r"^```.*?^```", flags=re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")  # [text](target) and ![alt](target "title")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _relative_links(md: Path) -> list[str]:
    """Link targets outside code blocks that point into the repository (no scheme, not a bare #anchor)."""
    text = FENCE.sub("", md.read_text())
    return [t for t in LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


def test_docs_index_links_every_page() -> None:
    index = set(_relative_links(DOCS / "README.md"))
    pages = {p.name for p in DOCS.glob("*.md")} - {"README.md"}
    assert pages <= index, f"docs/README.md does not link {sorted(pages - index)}"
    assert {"figures/training_curve.png", "figures/overlay.png"} <= index
    assert "docs/README.md" in _relative_links(REPO / "README.md")


@pytest.mark.parametrize("md", MARKDOWN, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(md: Path) -> None:
    missing = [t for t in _relative_links(md) if not (md.parent / t.split("#")[0]).exists()]
    assert not missing, f"{md.relative_to(REPO)} links to missing files: {missing}"


def test_committed_figures_are_small_pngs() -> None:
    for name in ("training_curve.png", "overlay.png"):
        data = (DOCS / "figures" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) < 200_000, (name, len(data))


def test_python_api_blocks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ```python block of docs/python_api.md, in order, in one namespace, as a reader would paste them."""
    blocks = re.findall(r"^```python\n(.*?)^```", (DOCS / "python_api.md").read_text(), flags=re.S | re.M)
    assert len(blocks) >= 10
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the blocks' mkdtemp() lands in tmp_path
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    namespace: dict = {"__name__": "__python_api_md__"}
    try:
        for i, block in enumerate(blocks):
            exec(compile(block, f"docs/python_api.md block {i}", "exec"), namespace)  # noqa: S102
    finally:
        torch.set_num_threads(threads)
    assert namespace["enc"].load_report.ok and namespace["vit"].load_report.ok
    assert (namespace["path"].parent / "adaptation_plan.json").is_file()


@pytest.fixture(scope="module")
def make_figures() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_figures", REPO / "scripts" / "make_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_log(logdir: Path) -> None:
    """A run as MONAI's TensorBoard handlers write it: the trainer's loss per iteration in one file, the
    evaluator's metrics per epoch in another; then a second run that rewrites epoch 4 (the latest wins)."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(logdir)) as train, SummaryWriter(str(logdir)) as val:
        for step in range(1, 13):
            train.add_scalar("train_loss", 2.0 - 0.1 * step, step)
        for epoch in range(1, 5):
            for tag, value in (("val_mean_dice", 0.2 * epoch), ("val_dice_1", 0.25 * epoch), ("val_dice_2", 0.1)):
                val.add_scalar(tag, value, epoch)
    with SummaryWriter(str(logdir)) as rerun:
        rerun.add_scalar("val_mean_dice", 0.5, 4)


def test_training_curve_from_tensorboard_log(tmp_path: Path, make_figures: ModuleType) -> None:
    _write_log(tmp_path / "logs")
    scalars = make_figures.read_scalars(tmp_path / "logs")
    assert [s for s, _ in scalars["train_loss"]] == list(range(1, 13))
    assert scalars["val_mean_dice"] == [(1, pytest.approx(0.2)), (2, pytest.approx(0.4)), (3, pytest.approx(0.6)),
                                        (4, pytest.approx(0.5))]
    out = make_figures.plot_training_curve(tmp_path / "logs", tmp_path / "figs" / "curve.png", title="tiny")
    assert out.read_bytes().startswith(PNG_MAGIC)
    assert sorted(p.name for p in out.parent.iterdir()) == ["curve.png"]  # no temporary file left
    with pytest.raises(KeyError, match="val_mean_dice"):
        make_figures.plot_training_curve(tmp_path / "logs", tmp_path / "bad.png", dice_tag="val_dice_9")
    with pytest.raises(FileNotFoundError):
        make_figures.read_scalars(tmp_path / "figs")


def test_overlay_from_volume(tmp_path: Path, make_figures: ModuleType) -> None:
    label = np.zeros((16, 16, 5), dtype=np.int64)
    label[4:12, 4:12, 1:4] = 1
    label[6:8, 6:8, 2] = 2
    pred = np.roll(label, 1, axis=0)
    image = label * 100.0 + np.random.default_rng(0).normal(size=label.shape)
    out = make_figures.plot_overlay(image, label, pred, tmp_path / "overlay.png", class_names=("bg", "a", "b"))
    assert out.read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(ValueError, match="shapes differ"):
        make_figures.plot_overlay(image, label[..., :4], pred, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()
