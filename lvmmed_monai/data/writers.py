"""Atomic image writers for MONAI's ``SaveImage`` / ``SaveImaged`` (``writer=AtomicNibabelWriter``).

MONAI's writers save straight to the target name, so an inference run killed while writing leaves a truncated
NIfTI that looks like a result. :class:`AtomicNibabelWriter` writes to a temporary file beside the target (same
extension, so nibabel picks the same format and compression) and renames it over the target.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from monai.config import PathLike
from monai.data import NibabelWriter

__all__ = ["AtomicNibabelWriter"]


class AtomicNibabelWriter(NibabelWriter):
    """MONAI's ``NibabelWriter`` (same data, affine and options) writing through a temporary file + rename."""

    def write(self, filename: PathLike, verbose: bool = False, **obj_kwargs) -> None:
        path = Path(filename)
        path.parent.mkdir(parents=True, exist_ok=True)
        ext = ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{ext}")
        os.close(fd)
        try:
            super().write(tmp, verbose=verbose, **obj_kwargs)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(path, 0o644 & ~umask)
