"""File writing shared by every layer: atomic writes of files and of whole folders (built beside the target,
then renamed), and the permissions of what is written through temporary files.

The lowest layer of the package (it imports nothing of it), so data loaders, weights, engines and scripts write
files the same way without importing each other.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_open", "save_atomic", "make_readable", "build_folder", "write_folder_once"]


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", suffix: str = ".tmp") -> Iterator[IO]:
    """Write ``path`` through a temporary file beside it: renamed over ``path`` when the block succeeds,
    deleted when it raises, so readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then rename: never a half-written checkpoint."""
    import torch

    with atomic_open(path) as fh:
        torch.save(obj, fh)
    return Path(path)


def make_readable(*paths: str | os.PathLike) -> None:
    """Give files written through a temporary file (``mkstemp``: mode 0600, e.g. :func:`atomic_open`) the usual
    mode of new files, 0644 less the umask (folders made by ``mkdtemp``, 0700: 0755 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in paths:
        os.chmod(path, (0o755 if os.path.isdir(path) else 0o644) & ~umask)


def build_folder(root: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Build the folder ``root`` with ``fill(tmp)`` in a temporary sibling, then rename it over ``root`` (an
    existing one is replaced), so an interrupted build leaves nothing half-written."""
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}."))
    try:
        fill(tmp)
        make_readable(tmp)
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def write_folder_once(root: str | os.PathLike, stamp: Mapping[str, Any], fill: Callable[[Path], None],
                      stamp_name: str = "phantoms.json") -> Path:
    """:func:`build_folder` with a ``stamp`` (JSON) stored as ``root/stamp_name``: a later call with the same
    stamp returns ``root`` at once."""
    root = Path(root)
    stamp = json.loads(json.dumps(dict(stamp)))  # as read back (tuples -> lists)
    if (root / stamp_name).is_file() and json.loads((root / stamp_name).read_text()) == stamp:
        return root

    def fill_and_stamp(tmp: Path) -> None:
        fill(tmp)
        (tmp / stamp_name).write_text(json.dumps(stamp))

    return build_folder(root, fill_and_stamp)
