"""File writing shared by every layer: atomic writes and the permissions of files written through them.

The lowest layer of the package (it imports nothing of it), so data loaders, weights, engines and scripts write
files the same way without importing each other.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_open", "save_atomic", "make_readable"]


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
