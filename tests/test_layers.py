"""Layers point down: a module of ``lvmmed_monai`` imports only from its own package or a lower layer, and never
the nnU-Net plugin (read from the source with ``ast``, lazy imports inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lvmmed_monai"
# low to high (docs/README.md, "Layers"); a package may import its own modules and any lower layer
LAYERS: dict[str, int] = {
    "config_values": 0, "io": 0, "process_group": 0, "optim": 0, "registry": 0,
    "weights": 1,
    "encoders": 2, "layers": 2,
    "demo": 3,
    "data": 4,
    "ssl": 5, "networks": 5,
    "evaluation": 6, "inference": 6,
    "engines": 7,
    "cli": 8, "__init__": 8,
}


def _part(module_path: Path) -> str:
    """The layer name of a file: its sub-package (``data``) or its top-level module (``weights``)."""
    rel = module_path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, imported module)`` of every import in ``path`` (absolute; relative ones are resolved)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # from .x import y: relative to the file's package
                base = list(path.relative_to(PACKAGE.parent).with_suffix("").parts[: -node.level])
                module = ".".join(base + ([module] if module else []))
            if module == "lvmmed_monai":  # from lvmmed_monai import weights: the names are the modules
                found += [(node.lineno, f"lvmmed_monai.{alias.name}") for alias in node.names]
            elif module:
                found.append((node.lineno, module))
    return found


def _violations() -> list[str]:
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = _part(path)
        for line, name in _imports(path):
            where = f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}"
            if name.split(".")[0] == "nnunet_plugin":
                bad.append(f"{where} (the library never imports the nnU-Net plugin)")
            elif name.startswith("lvmmed_monai."):
                target = name.split(".")[1]
                target = target if target in LAYERS else "__init__"  # a name of the package root
                if target != here and LAYERS[target] >= LAYERS[here]:
                    bad.append(f"{where} ({here}, layer {LAYERS[here]}, may not import {target}, layer "
                               f"{LAYERS[target]})")
    return bad


def test_every_part_of_the_package_has_a_layer():
    parts = {_part(p) for p in PACKAGE.rglob("*.py")}
    assert parts <= set(LAYERS), sorted(parts - set(LAYERS))


def test_no_module_imports_upwards_or_the_plugin():
    assert _violations() == []


def test_the_check_sees_upward_and_lazy_imports(tmp_path, monkeypatch):
    """The walker is not vacuous: a lazy upward import inside a function and a plugin import are reported."""
    fake = tmp_path / "lvmmed_monai"
    (fake / "data").mkdir(parents=True)
    (fake / "data" / "x.py").write_text("def f():\n    from lvmmed_monai.engines import as_bool\n")
    (fake / "io.py").write_text("import nnunet_plugin\nfrom lvmmed_monai.weights import load_weights\n")
    (fake / "engines.py").write_text("from lvmmed_monai.data import x\nfrom . import io\n")  # both fine
    (fake / "weights.py").write_text("from . import encoders\nfrom lvmmed_monai import __version__\n")
    monkeypatch.setattr(__name__ + ".PACKAGE", fake)
    bad = _violations()
    assert len(bad) == 5, bad
    assert any("weights.py:1 imports lvmmed_monai.encoders" in b for b in bad)  # relative, upwards
    assert any("weights.py:2 imports lvmmed_monai.__version__" in b for b in bad)  # the root is the top
    assert any("data/x.py:2 imports lvmmed_monai.engines" in b for b in bad)
    assert any("io.py:1 imports nnunet_plugin" in b for b in bad)
    assert any("io.py:2 imports lvmmed_monai.weights" in b for b in bad)


if __name__ == "__main__":
    pytest.main([__file__])
