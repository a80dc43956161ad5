"""Generated folders are built in a temporary sibling and renamed: nothing half-written, built once per stamp."""

from __future__ import annotations

import json

import pytest

from lvmmed_monai.io import build_folder, write_folder_once


def test_write_folder_once_builds_once_per_stamp_and_leaves_nothing_when_interrupted(tmp_path):
    calls = []

    def fill(tmp):
        calls.append(tmp)
        (tmp / "a.txt").write_text(str(len(calls)))

    def broken(tmp):
        (tmp / "part.txt").write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        write_folder_once(tmp_path / "data", {"v": 1}, broken)
    assert list(tmp_path.iterdir()) == []  # no folder, no temporary sibling
    root = write_folder_once(tmp_path / "data", {"v": (1, 2)}, fill, stamp_name="s.json")
    assert write_folder_once(tmp_path / "data", {"v": [1, 2]}, fill, stamp_name="s.json") == root
    assert len(calls) == 1 and json.loads((root / "s.json").read_text()) == {"v": [1, 2]}
    write_folder_once(tmp_path / "data", {"v": 3}, fill, stamp_name="s.json")  # new stamp: rebuilt, replaced
    assert len(calls) == 2 and (root / "a.txt").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_build_folder_replaces_an_existing_folder_only_when_the_build_succeeds(tmp_path):
    build_folder(tmp_path / "run", lambda tmp: (tmp / "old.txt").write_text("old"))
    with pytest.raises(ValueError):
        build_folder(tmp_path / "run", lambda tmp: (_ for _ in ()).throw(ValueError("bad")))
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["old.txt"]  # the old folder survives a failure
    build_folder(tmp_path / "run", lambda tmp: (tmp / "new.txt").write_text("new"))
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
