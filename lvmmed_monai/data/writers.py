"""Atomic image writers for MONAI's ``SaveImage`` / ``SaveImaged`` (``writer=AtomicNibabelWriter``).

MONAI's writers save straight to the target name, so an inference run killed while writing leaves a truncated
NIfTI that looks like a result. :class:`AtomicNibabelWriter` writes to a temporary file beside the target (same
extension, so nibabel picks the same format and compression) and renames it over the target;
:class:`AtomicPILWriter` does the same for PNG label maps (2D inputs). :func:`write_folder_once` does it for a
whole folder of generated data.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from monai.config import PathLike
from monai.data import NibabelWriter, PILWriter

from lvmmed_monai.io import make_readable

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
        make_readable(path)


class AtomicNibabelWriter(AtomicWriteMixin, NibabelWriter):
    """MONAI's ``NibabelWriter`` (same data, affine and options) writing through a temporary file + rename.

    One difference: ``squeeze_end_dims`` drops a singleton channel only, so the file keeps the input's spatial
    shape. MONAI's writer also drops trailing singleton spatial axes (a ``(1, 4000, 1)`` volume's label map came
    back ``(1, 4000)``) and pads 2D data to 3D before that."""

    def set_data_array(self, data_array: Any, channel_dim: int | None = 0, squeeze_end_dims: bool = True,
                       **kwargs: Any) -> None:
        """``data_array`` channel-first (``channel_dim``) -> channel-last, spatial axes as given."""
        if not squeeze_end_dims or channel_dim is None or "spatial_ndim" in kwargs:
            return super().set_data_array(data_array, channel_dim, squeeze_end_dims, **kwargs)
        data = self.convert_to_channel_last(data_array, channel_dim, squeeze_end_dims=False, spatial_ndim=None)
        self.data_obj = data[..., 0] if data.shape[-1] == 1 and data.ndim > 2 else data


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
