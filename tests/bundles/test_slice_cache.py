"""The sharded slice cache at scale: parallel preparation equals serial, an interrupted one resumes, a rerun only
stats, shards round-trip exactly, dataset weights, the cache_rate memory rule and ``lvmmed prepare-data``."""

from __future__ import annotations

import os
import threading
from collections import Counter

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

import lvmmed_monai.data.pretrain as pretrain
from lvmmed_monai.cli import main as lvmmed
from lvmmed_monai.data.pipeline import CACHED_SLICE_OVERHEAD, resolve_cache_rate
from lvmmed_monai.data.pretrain import prepare_part, prepare_slices
from lvmmed_monai.data.sampling import GlobalBatchSampler, dataset_weights, modality_weights
from lvmmed_monai.data.slice_cache import ShardWriter, SliceIndex, build_index, lookup, read_manifests


@pytest.fixture
def collection(tmp_path):
    """2 volumes of different sizes (ct/), 7 images of different sizes (xr/), one unreadable file (xr/)."""
    root, rng = tmp_path / "data", np.random.default_rng(0)
    (root / "ct").mkdir(parents=True)
    (root / "xr").mkdir()
    for i, shape in enumerate([(20, 16, 5), (12, 18, 3)]):
        nib.save(nib.Nifti1Image(rng.random(shape).astype(np.float32) * 900, np.eye(4)), root / "ct" / f"v{i}.nii.gz")
    for i in range(7):
        Image.fromarray(rng.integers(0, 255, (10 + i, 9 + 2 * i), dtype=np.uint8)).save(root / "xr" / f"x{i}.png")
    (root / "xr" / "broken.png").write_bytes(b"not an image" * 8)
    return root


@pytest.fixture
def decodes(monkeypatch):
    """Counts the files decoded in this process (``load_normalized`` calls); ``fail_at``: raise at that call."""
    state = {"calls": 0, "fail_at": None}
    real = pretrain.load_normalized

    def counted(*args, **kwargs):
        state["calls"] += 1
        if state["calls"] == state["fail_at"]:
            raise KeyboardInterrupt("stopped")  # as Ctrl-C or a scheduler's signal would
        return real(*args, **kwargs)

    monkeypatch.setattr(pretrain, "load_normalized", counted)
    return state


def _same(a: SliceIndex, b: SliceIndex) -> None:
    """Same entries (shard names and offsets aside: those depend on who wrote what) and the same slices."""
    assert len(a) == len(b)
    strip = ("image", "offset")
    for i in range(len(a)):
        assert {k: v for k, v in a[i].items() if k not in strip} == {k: v for k, v in b[i].items() if k not in strip}
        np.testing.assert_array_equal(a.read(i), b.read(i))


def test_parallel_and_per_part_preparation_equal_serial(collection, tmp_path, decodes):
    serial = prepare_slices(collection, tmp_path / "serial", workers=1)
    assert decodes["calls"] == 10 and len(serial) == 5 + 3 + 7
    assert Counter(e["dataset"] for e in serial) == {"ct": 8, "xr": 7}
    assert [serial[i]["source"] for i in (0, 5, 8)] == [str(collection / "ct" / n) for n in
                                                         ("v0.nii.gz", "v1.nii.gz")] + [str(collection / "xr/x0.png")]
    _same(serial, prepare_slices(collection, tmp_path / "parallel", workers=2))
    # parts, as ranks (or machines with --part) write them: part 1 of 2, then part 0, then the merge decodes nothing
    assert prepare_part(collection, tmp_path / "parts", part=(1, 2), workers=1) == 5
    assert prepare_part(collection, tmp_path / "parts", part=(0, 2), workers=2) == 5
    calls = decodes["calls"]
    _same(serial, prepare_slices(collection, tmp_path / "parts", workers=2))
    assert decodes["calls"] == calls


def test_interrupted_preparation_resumes_and_a_rerun_decodes_nothing(collection, tmp_path, decodes):
    reference = prepare_slices(collection, tmp_path / "reference")
    decodes.update(calls=0, fail_at=4)
    with pytest.raises(KeyboardInterrupt):
        prepare_slices(collection, tmp_path / "cache")  # the 4th file stops it: 3 are finished and flushed
    assert not list((tmp_path / "cache").glob("index-*.npz"))
    decodes.update(calls=0, fail_at=None)
    _same(reference, prepare_slices(collection, tmp_path / "cache"))
    assert decodes["calls"] == 10 - 3  # the unfinished ones only (the unreadable file included)
    decodes["calls"] = 0
    _same(reference, prepare_slices(collection, tmp_path / "cache", workers=2))
    assert decodes["calls"] == 0  # stats only, the unreadable file is remembered too
    # a killed writer: a shard whose manifest was never written does not count; its files are redone
    manifests = sorted((tmp_path / "cache" / "shards").glob("*.npz"))
    lost = int(np.load(manifests[-1])["keys"].size) + int(np.load(manifests[-1])["failed_keys"].size)
    manifests[-1].unlink()
    for index_file in (tmp_path / "cache").glob("index-*.npz"):
        index_file.unlink()
    _same(reference, prepare_slices(collection, tmp_path / "cache"))
    assert decodes["calls"] == lost >= 1
    # a changed file is decoded again, alone
    decodes["calls"] = 0
    os.utime(collection / "xr" / "x3.png", ns=(1, 1))
    _same(reference, prepare_slices(collection, tmp_path / "cache"))
    assert decodes["calls"] == 1


def test_ranks_wait_for_each_others_shares_by_marks_in_the_cache(tmp_path):
    """Rank 1 finishes first and waits (polling, no collective); rank 0's mark releases it; stale marks of other
    files do not count."""
    keys = [f"{i:020d}" for i in range(5)]
    (tmp_path / "ready").mkdir()
    (tmp_path / "ready" / "c-0-of-2").write_text("an earlier collection")
    waiter = threading.Thread(target=pretrain._wait_for_shares, args=(tmp_path, "c", keys, 1, 2, 0.01))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive()  # rank 0's share is not done
    pretrain._wait_for_shares(tmp_path, "c", keys, 0, 2, 0.01)
    waiter.join(5)
    assert not waiter.is_alive()


def test_bad_files_are_remembered_and_follow_on_error(collection, tmp_path, caplog):
    prepare_slices(collection, tmp_path / "cache", on_error="skip")
    with caplog.at_level("WARNING"):
        prepare_slices(collection, tmp_path / "cache", on_error="skip")
    assert any("broken.png" in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)
    with pytest.raises(pretrain.PretrainDataError, match=r"broken\.png: unreadable"):
        prepare_slices(collection, tmp_path / "cache", on_error="raise")
    with pytest.raises(pretrain.PretrainDataError, match=r"broken\.png: unreadable"):
        prepare_slices(collection, tmp_path / "fresh", on_error="raise", workers=2)


def test_sharded_cache_round_trips_slices_of_mixed_sizes_exactly(tmp_path):
    rng = np.random.default_rng(1)
    files = [rng.standard_normal((int(s), int(h), int(w))).astype(np.float16)
             for s, h, w in rng.integers(1, 9, (12, 3)) * [1, 7, 5]]
    writer = ShardWriter(tmp_path / "shards", "w", shard_bytes=4000)  # several shards
    for i, slices in enumerate(files):
        writer.add(f"{i:020d}", slices)
    writer.fail("f" * 20, "a reason")
    writer.flush()
    assert len(list((tmp_path / "shards").glob("*.npy"))) > 2
    found = read_manifests(tmp_path)
    keys = np.array([f"{i:020d}" for i in range(12)], dtype="S20")
    rows = lookup(found["keys"], keys)
    assert (rows >= 0).all() and lookup(found["failed_keys"], np.array(["f" * 20], "S20"))[0] >= 0
    index = build_index(tmp_path, [f"src{i}" for i in range(12)], ["a", "b"] * 6, found, rows)
    assert len(index) == sum(len(f) for f in files)
    expected = [(i, s) for i, f in enumerate(files) for s in range(len(f))]
    for j, (i, s) in enumerate(expected):
        assert index[j]["source"] == f"src{i}" and index[j]["slice"] == s
        np.testing.assert_array_equal(index.read(j), files[i][s])  # bit for bit, float16
    assert index.slice_file.nbytes + index.slice_number.nbytes == 8 * len(index)  # 8 bytes per slice
    sub = index[3:9]
    assert len(sub) == 6 and sub[0] == index[3]
    with pytest.raises(ValueError, match="float16"):
        writer.add("x" * 20, files[0].astype(np.float32))


def test_dataset_weights_equal_proportional_given_and_the_sampler(collection, tmp_path):
    index = prepare_slices(collection, tmp_path / "cache")  # ct: 8 slices, xr: 7
    ids = index.dataset_ids
    assert dataset_weights(index) is None and dataset_weights(index, "proportional") is None
    equal = dataset_weights(index, "equal")
    assert [equal[ids == d].sum() for d in (0, 1)] == pytest.approx([0.5, 0.5])
    np.testing.assert_allclose(modality_weights(index), equal)
    given = dataset_weights(index, {"ct": 1, "xr": 3})
    assert [given[ids == d].sum() for d in (0, 1)] == pytest.approx([0.25, 0.75])
    sampler = GlobalBatchSampler(index, 16, num_replicas=1, rank=0, weights=given, num_samples=4000)
    drawn = Counter(index.datasets[ids[i]] for i, _ in sampler)
    assert abs(drawn["xr"] - 3000) < 4 * (4000 * 0.75 * 0.25) ** 0.5  # 4 sigma of Binomial(4000, 3/4)
    assert dataset_weights([{"modality": "a"}] * 3 + [{"modality": "b"}], "equal").tolist() == [1 / 6] * 3 + [0.5]
    with pytest.raises(ValueError, match=r"unknown \['mr'\], not named \['xr'\]"):
        dataset_weights(index, {"ct": 1, "mr": 2})
    with pytest.raises(ValueError, match="equal"):
        dataset_weights(index, "balanced")


def test_cache_rate_stays_within_its_share_of_memory(collection, tmp_path, monkeypatch):
    index = prepare_slices(collection, tmp_path / "cache")
    need = 2 * int(index.slice_pixels.sum()) + CACHED_SLICE_OVERHEAD * len(index)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert resolve_cache_rate(index, "auto", 0.25, memory=8 * need) == 1.0
    assert resolve_cache_rate(index, "auto", 0.25, memory=2 * need) == 0.5
    assert resolve_cache_rate(index, 0.5, 0.25, memory=2 * need) == 0.5
    with pytest.raises(ValueError, match=r"cache_rate 1.0 keeps .* more than cache_memory_share 0.25 .*1 process"
                                         r".*set cache_rate auto \(here 0.5\)"):
        resolve_cache_rate(index, 1.0, 0.25, memory=2 * need)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two ranks on the machine: each gets half
    assert resolve_cache_rate(index, "auto", 0.25, memory=2 * need) == 0.25
    assert 0 < resolve_cache_rate(index) <= 1  # this machine, default share
    with pytest.raises(ValueError, match="cache_rate must be"):
        resolve_cache_rate(index, 1.5)


def test_prepare_data_command_fills_the_cache_the_bundle_reuses(collection, tmp_path, capsys, decodes):
    assert lvmmed(["prepare-data", str(collection), "--cache-dir", str(tmp_path / "c"), "--workers", "1",
                   "--progress", "false"]) == 0
    assert "15 slices" in capsys.readouterr().out and decodes["calls"] == 10
    assert len(prepare_slices(collection, tmp_path / "c")) == 15 and decodes["calls"] == 10
    assert lvmmed(["prepare-data", str(collection), "--cache-dir", str(tmp_path / "p"), "--part", "1/2",
                   "--progress", "false"]) == 0
    assert "part 1/2: 5 file(s) decoded" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        lvmmed(["prepare-data", str(collection), "--cache-dir", str(tmp_path / "p"), "--part", "2/2"])
