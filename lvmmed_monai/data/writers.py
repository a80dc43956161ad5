"""Atomic image writers for MONAI's ``SaveImage`` / ``SaveImaged`` (``writer=AtomicNibabelWriter``).

MONAI's writers save straight to the target name, so an inference run killed while writing leaves a truncated
NIfTI that looks like a result. :class:`AtomicNibabelWriter` writes to a temporary file beside the target (same
extension, so nibabel picks the same format and compression) and renames it over the target;
:class:`AtomicPILWriter` does the same for PNG label maps (2D inputs).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from monai.config import PathLike
from monai.data import NibabelWriter, PILWriter

__all__ = ["AtomicWriteMixin", "AtomicNibabelWriter", "AtomicPILWriter", "atomic_writer"]


class AtomicWriteMixin:
    """Put before a MONAI ``ImageWriter`` class: ``write`` goes to a temporary file beside the target (same
    extension, so the writer picks the same format) that is renamed over the target, or deleted on failure."""

    def write(self, filename: PathLike, verbose: bool = False, **obj_kwargs) -> None:
        path = Path(filename)
        path.parent.mkdir(parents=True, exist_ok=True)
        ext = ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{ext}")
        os.close(fd)
        try:
            super().write(tmp, verbose=verbose, **obj_kwargs)  # type: ignore[misc]
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(path, 0o644 & ~umask)


class AtomicNibabelWriter(AtomicWriteMixin, NibabelWriter):
    """MONAI's ``NibabelWriter`` (same data, affine and options) writing through a temporary file + rename."""


class AtomicPILWriter(AtomicWriteMixin, PILWriter):
    """MONAI's ``PILWriter`` (2D PNG, same options) writing through a temporary file + rename."""


def atomic_writer(output_ext: str) -> type:
    """The atomic writer class for ``output_ext``: NIfTI (``.nii.gz``, ``.nii``) or PNG (``.png``)."""
    ext = str(output_ext).lower()
    if ext in (".nii.gz", ".nii"):
        return AtomicNibabelWriter
    if ext == ".png":
        return AtomicPILWriter
    raise ValueError(f"no atomic writer for {output_ext!r}; valid: ['.nii.gz', '.nii', '.png']")
