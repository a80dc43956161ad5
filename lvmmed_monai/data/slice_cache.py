"""The pretraining slice cache: float16 slices of many files in a few shard files, and a compact index of them.

LVM-Med's collection is 1.3M 2D slices; a file per input and a Python dict per slice do not scale to it. A cache
folder holds

* ``shards/<writer>-<n>.npy``: one flat float16 buffer with the slices of several input files one after another
  (each slice row-major, slices of different files may differ in size), read through a memory map;
* ``shards/<writer>-<n>.npz``: its manifest, written after the shard: per finished input file its key (a hash of
  path, size, mtime and the slicing settings, :func:`file_key`), slice count, height, width and offset in the
  shard; and the keys and messages of files that could not be used. A file counts as prepared once a manifest
  lists it, so an interrupted preparation loses only what its writers had not flushed yet;
* ``index-<hash>.npz``: the merged :class:`SliceIndex` of one collection and its settings, with every file's key,
  so a later run only stats the files and loads it (:func:`load_index`).

Both are written atomically (:func:`~lvmmed_monai.io.atomic_open`) under names no other writer uses, so ranks and
worker processes write side by side without locks. The index holds numpy arrays: per slice its file and its
number in the file (8 bytes); per file its shard, offset, height, width, dataset and path (30 bytes plus the path's
UTF-8 bytes); no Python object per slice.
"""

from __future__ import annotations

import functools
import hashlib
import os
import stat
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from lvmmed_monai.io import atomic_open

__all__ = ["SliceIndex", "ShardWriter", "file_key", "read_manifests", "lookup", "build_index", "load_index",
           "save_index", "read_slice", "CACHE_VERSION"]

CACHE_VERSION = "2"
_KEY = "S20"  # 20 hex digits of a SHA-1


def file_key(path: str | os.PathLike, settings: str) -> str:
    """Key of an input file (or a DICOM series folder) under ``settings``: its absolute path, size and mtime (of
    every file of a folder); stats only, nothing is read. A missing file gets a key of its own."""
    path = os.path.abspath(path)
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            entries = sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(path)
                             if e.is_file())
            stats: object = entries
        else:
            stats = (st.st_size, st.st_mtime_ns)
    except OSError:
        stats = "missing"
    return hashlib.sha1(f"{CACHE_VERSION}|{path}|{stats}|{settings}".encode()).hexdigest()[:20]


@functools.lru_cache(maxsize=64)
def _open_shard(path: str) -> np.ndarray:
    return np.load(path, mmap_mode="r")


def read_slice(shard: str | os.PathLike, offset: int, shape: Sequence[int]) -> np.ndarray:
    """Slice ``(H, W)`` float16 at element ``offset`` of a shard (memory-mapped; the last 64 shards stay open)."""
    h, w = int(shape[0]), int(shape[1])
    return np.asarray(_open_shard(str(shard))[int(offset): int(offset) + h * w]).reshape(h, w)


class ShardWriter:
    """Collects the slices of finished files and writes them as shards of about ``shard_bytes`` (then their
    manifest): ``add`` per file, ``fail`` per unusable file, ``flush`` at the end (also after an error)."""

    def __init__(self, folder: str | os.PathLike, name: str, shard_bytes: int = 32 << 20) -> None:
        self.folder, self.name, self.shard_bytes, self.written = Path(folder), name, int(shard_bytes), 0
        self._reset()

    def _reset(self) -> None:
        self.parts: list[np.ndarray] = []
        self.keys: list[str] = []
        self.failed: list[tuple[str, str]] = []
        self.nbytes = 0

    def add(self, key: str, slices: np.ndarray) -> None:
        """The ``(S, H, W)`` float16 slices of the file of ``key``."""
        if slices.ndim != 3 or slices.dtype != np.float16:
            raise ValueError(f"slices must be (S, H, W) float16, got {slices.shape} {slices.dtype}")
        self.parts.append(slices)
        self.keys.append(key)
        self.nbytes += slices.nbytes
        if self.nbytes >= self.shard_bytes:
            self.flush()

    def fail(self, key: str, message: str) -> None:
        self.failed.append((key, message))

    def flush(self) -> None:
        if not self.keys and not self.failed:
            return
        stem = self.folder / f"{self.name}-{self.written:04d}"
        counts = np.array([len(p) for p in self.parts], dtype=np.int32)
        hw = np.array([p.shape[1:] for p in self.parts], dtype=np.int32).reshape(-1, 2)
        sizes = counts.astype(np.int64) * hw[:, 0] * hw[:, 1]
        offsets = (np.cumsum(sizes) - sizes).astype(np.int64)
        flat = np.concatenate([p.reshape(-1) for p in self.parts]) if self.parts else np.zeros(0, np.float16)
        with atomic_open(stem.with_suffix(".npy")) as fh:
            np.save(fh, flat)
        with atomic_open(stem.with_suffix(".npz")) as fh:  # the manifest last: it says the shard is complete
            np.savez(fh, keys=np.array(self.keys, dtype=_KEY), count=counts, hw=hw, offset=offsets,
                     failed_keys=np.array([k for k, _ in self.failed], dtype=_KEY),
                     failed_messages=np.array([m for _, m in self.failed], dtype=str))
        self.written += 1
        self._reset()


def read_manifests(cache_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every finished file of ``cache_dir/shards`` as arrays: ``keys`` (sorted), ``shard`` (name), ``count``,
    ``hw``, ``offset``; and ``failed_keys`` / ``failed_messages``. A key found twice (two writers) keeps one."""
    names, parts, failed, messages = [], [], [], []
    for manifest in sorted((Path(cache_dir) / "shards").glob("*.npz")):
        with np.load(manifest) as m:
            names.append(manifest.stem)
            parts.append({k: m[k] for k in ("keys", "count", "hw", "offset")})
            failed.append(m["failed_keys"])
            messages.append(m["failed_messages"])
    keys = np.concatenate([p["keys"] for p in parts]) if parts else np.zeros(0, _KEY)
    shard = np.concatenate([np.full(len(p["keys"]), i, np.int32) for i, p in enumerate(parts)]) if parts else \
        np.zeros(0, np.int32)
    keys, first = np.unique(keys, return_index=True)
    out = {"keys": keys, "shard_names": np.array(names, dtype=str), "shard": shard[first]}
    for name, dtype, shape in (("count", np.int32, (0,)), ("hw", np.int32, (0, 2)), ("offset", np.int64, (0,))):
        out[name] = (np.concatenate([p[name] for p in parts]) if parts else np.zeros(shape, dtype))[first]
    fkeys = np.concatenate(failed) if failed else np.zeros(0, _KEY)
    fmsgs = np.concatenate(messages) if messages else np.zeros(0, str)
    fkeys, ffirst = np.unique(fkeys, return_index=True)
    out["failed_keys"], out["failed_messages"] = fkeys, fmsgs[ffirst]
    return out


def lookup(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Position of each of ``keys`` in ``sorted_keys``, -1 where absent."""
    if not len(sorted_keys):
        return np.full(len(keys), -1, np.int64)
    pos = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return np.where(sorted_keys[pos] == keys, pos, -1)


class SliceIndex(Sequence):
    """The slices of a prepared collection, in the collection's file order: ``index[i]`` is the entry
    :class:`~lvmmed_monai.data.pretrain.LoadSliced` reads, ``{"image": shard, "offset", "shape": (H, W),
    "slice": number in its file, "dataset" (= "modality"): sub-folder, "source": input file}``; ``index[a:b]``
    (or an integer array) is a sub-index. Arrays: ``slice_file``, ``slice_number`` (int32 per slice); per file
    ``file_shard`` (int32), ``file_offset`` (int64), ``file_hw`` (int32 x 2), ``file_dataset`` (int16),
    ``path_bytes`` / ``path_offsets`` (the paths, UTF-8); tables ``shards`` and ``datasets``."""

    FILE_ARRAYS = ("file_shard", "file_offset", "file_hw", "file_dataset", "path_bytes", "path_offsets")

    def __init__(self, root: str | os.PathLike, shards: Sequence[str], datasets: Sequence[str],
                 slice_file: np.ndarray, slice_number: np.ndarray, **files: np.ndarray) -> None:
        self.root = Path(root)
        self.shards, self.datasets = [str(s) for s in shards], [str(d) for d in datasets]
        self.slice_file = np.asarray(slice_file, np.int32)
        self.slice_number = np.asarray(slice_number, np.int32)
        for name in self.FILE_ARRAYS:
            setattr(self, name, np.asarray(files[name]))

    def __len__(self) -> int:
        return len(self.slice_file)

    def __iter__(self) -> Iterator[dict]:
        return (self[i] for i in range(len(self)))

    def __getitem__(self, item):  # noqa: ANN001 - int -> entry, slice / int array -> SliceIndex
        if not isinstance(item, (int, np.integer)):
            return SliceIndex(self.root, self.shards, self.datasets, self.slice_file[item], self.slice_number[item],
                              **{n: getattr(self, n) for n in self.FILE_ARRAYS})
        f, number = int(self.slice_file[item]), int(self.slice_number[item])
        h, w = (int(v) for v in self.file_hw[f])
        dataset = self.datasets[self.file_dataset[f]]
        return {"image": str(self.root / "shards" / f"{self.shards[self.file_shard[f]]}.npy"),
                "offset": int(self.file_offset[f]) + number * h * w, "shape": (h, w), "slice": number,
                "dataset": dataset, "modality": dataset, "source": self.path(f)}

    def path(self, file: int) -> str:
        """The input file of file number ``file``."""
        return bytes(self.path_bytes[self.path_offsets[file]: self.path_offsets[file + 1]]).decode()

    def read(self, i: int) -> np.ndarray:
        """Slice ``i``, ``(H, W)`` float16."""
        entry = self[int(i)]
        return read_slice(entry["image"], entry["offset"], entry["shape"])

    @property
    def dataset_ids(self) -> np.ndarray:
        """Dataset (sub-folder) number of every slice, into :attr:`datasets`."""
        return self.file_dataset[self.slice_file]

    @property
    def slice_pixels(self) -> np.ndarray:
        """Pixels (``H * W``) of every slice, int64."""
        hw = self.file_hw.astype(np.int64)
        return (hw[:, 0] * hw[:, 1])[self.slice_file]

    @property
    def nbytes(self) -> int:
        """Memory of the index arrays (the tables of names aside)."""
        return self.slice_file.nbytes + self.slice_number.nbytes + sum(getattr(self, n).nbytes
                                                                       for n in self.FILE_ARRAYS)


def build_index(root: str | os.PathLike, paths: Sequence[str], datasets: Sequence[str], found: Mapping,
                rows: np.ndarray) -> SliceIndex:
    """:class:`SliceIndex` of the files ``paths`` (with their ``datasets``) whose rows in :func:`read_manifests`'
    arrays ``found`` are ``rows``; files are kept in the given order, their slices one after another."""
    rows = np.asarray(rows, np.int64)
    names, file_dataset = np.unique(np.asarray(datasets, dtype=str), return_inverse=True)
    used, shard = np.unique(found["shard"][rows], return_inverse=True)
    counts = found["count"][rows].astype(np.int64)
    first = np.cumsum(counts) - counts
    slice_file = np.repeat(np.arange(len(rows), dtype=np.int32), counts)
    encoded = [p.encode() for p in paths]
    return SliceIndex(
        root, found["shard_names"][used], names, slice_file,
        np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(first, counts),
        file_shard=shard.astype(np.int32), file_offset=found["offset"][rows], file_hw=found["hw"][rows],
        file_dataset=file_dataset.astype(np.int16),
        path_bytes=np.frombuffer(b"".join(encoded), np.uint8).copy(),
        path_offsets=np.concatenate([[0], np.cumsum([len(e) for e in encoded])]).astype(np.int64))


def save_index(path: str | os.PathLike, index: SliceIndex, keys: Sequence[str],
               failed: Sequence[tuple[str, str]] = ()) -> None:
    """Write ``index`` with the ``keys`` of every file of its collection (prepared or failed) and the
    ``(path, message)`` of the failed ones, atomically."""
    arrays = {n: getattr(index, n) for n in SliceIndex.FILE_ARRAYS}
    with atomic_open(path) as fh:
        np.savez(fh, shards=np.array(index.shards, dtype=str), datasets=np.array(index.datasets, dtype=str),
                 slice_file=index.slice_file, slice_number=index.slice_number, keys=np.array(keys, dtype=_KEY),
                 failed=np.array(list(failed), dtype=str).reshape(-1, 2), **arrays)


def load_index(path: str | os.PathLike, keys: Sequence[str]) -> tuple[SliceIndex, list[tuple[str, str]]] | None:
    """The index saved at ``path`` and its failed files, if its files' keys are ``keys`` (nothing changed) and its
    shards exist; None otherwise."""
    path = Path(path)
    if not path.is_file():
        return None
    with np.load(path) as saved:
        if not np.array_equal(saved["keys"], np.array(keys, dtype=_KEY)):
            return None
        arrays = {k: saved[k] for k in saved.files}
    index = SliceIndex(path.parent, arrays.pop("shards"), arrays.pop("datasets"), arrays.pop("slice_file"),
                       arrays.pop("slice_number"), **{n: arrays[n] for n in SliceIndex.FILE_ARRAYS})
    if not all((path.parent / "shards" / f"{s}.npy").is_file() for s in index.shards):
        return None
    return index, [(str(p), str(m)) for p, m in arrays["failed"]]
