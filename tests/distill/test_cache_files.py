"""The cache's files at the corpus sizes they exist for: open descriptors and memory maps
bounded whatever the number of shards (Amber's 25,200 included), flushes of what a part
touched only, files of the right size, rows read back as written, and the row checksum
catching the damaged rows the row rules pass. Synthetic targets, sparse files, no teacher."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fbi.distill import progress as progress_module
from fbi.distill.cache_files import CacheFiles, file_names, row_checksum
from fbi.distill.progress import Progress, ProgressLog
from fbi.distill.rows import bad_rows, decode_units

SEQ, SLOTS = 4, 3


def manifest(shards: int, samples=2, mode="topk", value_dtype="float16", slots=SLOTS) -> dict:
    return {"mode": mode, "value_dtype": value_dtype, "id_dtype": "uint16",
            "count_dtype": "uint8", "seq_len": SEQ, "slots": slots,
            "token_shards": [{"file": f"train_{i:06d}.bin", "samples": samples + i % 3}
                             for i in range(shards)]}


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def maps() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def fake_row(rng, sample: int, m: dict):
    ids = rng.integers(0, 500, (SEQ, m["slots"])).astype(np.uint16)
    vals = rng.standard_normal((SEQ, m["slots"])).astype(np.float16)
    tail = rng.standard_normal(SEQ).astype(np.float16)
    return ids, vals, tail


def test_create_makes_every_file_at_its_final_size(tmp_path):
    m = manifest(7, mode="topk", value_dtype="float32")
    CacheFiles.create(tmp_path, m)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(file_names(m))
    for s in m["token_shards"]:
        stem, n = Path(s["file"]).stem, s["samples"]
        assert (tmp_path / f"{stem}.ids").stat().st_size == n * SEQ * SLOTS * 2
        assert (tmp_path / f"{stem}.vals").stat().st_size == n * SEQ * SLOTS * 4
        assert (tmp_path / f"{stem}.tail").stat().st_size == n * SEQ * 4
        assert (tmp_path / f"{stem}.crc").stat().st_size == n * 4


@pytest.fixture
def memory_dir(tmp_path):
    """A folder in memory where there is one: 100,800 files each synced once cost minutes of
    disk syncs, which are not what the test is about (bench/cache_scale.py times them)."""
    if not Path("/dev/shm").is_dir():
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="fbi-cache-") as d:
        yield Path(d)


@pytest.mark.slow
def test_amber_shard_count_keeps_descriptors_and_maps_bounded_and_rows_right(memory_dir):
    """25,200 shards (Amber's count): every shard written and read, at most 64 open files."""
    shards, cap, tmp_path = 25_200, 64, memory_dir
    m = manifest(shards)
    CacheFiles.create(tmp_path, m)
    fds, mapped = open_fds(), maps()
    rng = np.random.default_rng(0)
    starts = np.cumsum([0] + [s["samples"] for s in m["token_shards"]])
    samples = [(shard, int(rng.integers(0, m["token_shards"][shard]["samples"])))
               for shard in rng.permutation(shards)]
    writer = CacheFiles(tmp_path, m, writable=True, max_open=cap)
    written = {}
    for shard, row in samples:
        sample = int(starts[shard]) + row
        written[shard, row] = fake_row(rng, sample, m)
        writer.write(shard, row, sample, *written[shard, row])
    peak_writing = open_fds() - fds
    writer.close()
    reader = CacheFiles(tmp_path, m, max_open=cap)
    for i, (shard, row) in enumerate(reversed(samples)):
        got = reader.read(shard, row)
        ids, vals, tail = written[shard, row]
        # an independent read of the same row: numpy over the whole file
        stem = Path(m["token_shards"][shard]["file"]).stem
        if i % 500 == 0:
            assert np.array_equal(np.fromfile(tmp_path / f"{stem}.ids", np.uint16)
                                  .reshape(-1, SEQ, SLOTS)[row], ids)
        assert np.array_equal(got.ids, ids) and np.array_equal(got.vals, vals)
        assert np.array_equal(got.tail, tail)
        assert got.crc == row_checksum(int(starts[shard]) + row, ids, vals, tail)
    assert peak_writing <= cap and open_fds() - fds <= cap
    assert reader.peak_open == cap and writer.peak_open == cap
    assert maps() - mapped < 256  # no map per file (the allocator adds some)


def test_flush_syncs_only_the_files_a_part_touched(tmp_path, monkeypatch):
    m = manifest(50)
    CacheFiles.create(tmp_path, m)
    files = CacheFiles(tmp_path, m, writable=True, max_open=200)
    rng = np.random.default_rng(1)
    for shard in range(50):  # every file open (and synced once)
        files.write(shard, 0, shard, *fake_row(rng, shard, m))
    files.flush()
    synced = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync",
                        lambda fd: (synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name),
                                    real(fd)))
    for shard in (3, 17):  # one part's rows
        files.write(shard, 1, 100 + shard, *fake_row(rng, shard, m))
    files.flush()
    assert sorted(synced) == sorted(f"train_{s:06d}.{k}" for s in (3, 17)
                                    for k in ("ids", "vals", "tail", "crc"))
    synced.clear()
    files.flush()
    assert synced == []


def test_an_evicted_file_is_synced_before_it_is_closed(tmp_path, monkeypatch):
    m = manifest(3)
    CacheFiles.create(tmp_path, m)
    files = CacheFiles(tmp_path, m, writable=True, max_open=4)
    synced = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync",
                        lambda fd: (synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name),
                                    real(fd)))
    files.write(0, 0, 0, *fake_row(np.random.default_rng(0), 0, m))
    assert synced == []
    files.write(1, 0, 2, *fake_row(np.random.default_rng(0), 2, m))  # evicts shard 0's files
    assert sorted(synced) == [f"train_000000.{k}" for k in ("crc", "ids", "tail", "vals")]


def test_the_checksum_catches_damaged_rows_the_row_rules_pass(tmp_path):
    """A confident sampled row whose ids read back as zeros; ids of one write paired with
    counts of another; an unwritten top-1 uint8 row (all zeros: weight 0, tail 1)."""
    m = manifest(1, samples=4, mode="sampled", slots=4)
    CacheFiles.create(tmp_path, m)
    files = CacheFiles(tmp_path, m, writable=True)
    confident = (np.tile(np.array([7, 0, 0, 0], np.uint16), (SEQ, 1)),
                 np.tile(np.array([4, 0, 0, 0], np.uint8), (SEQ, 1)), None)
    spread = (np.tile(np.array([5, 9, 11, 2], np.uint16), (SEQ, 1)),
              np.tile(np.array([1, 1, 1, 1], np.uint8), (SEQ, 1)), None)
    files.write(0, 0, 0, *confident)
    files.write(0, 1, 1, *spread)
    files.write(0, 2, 2, *spread)
    files.close()

    def rules_pass(r):
        weights = torch.from_numpy(r.vals.astype(np.float32)) / 4
        return bad_rows(r.ids, weights, None, 500, 1e-5) == []

    def checksum_ok(sample, r):
        return row_checksum(sample, r.ids, r.vals, r.tail) == r.crc

    reader = CacheFiles(tmp_path, m)
    assert all(checksum_ok(i, reader.read(0, i)) for i in range(3))
    ids = np.memmap(tmp_path / "train_000000.ids", np.uint16, "r+").reshape(-1, SEQ, 4)
    ids[0] = 0  # token 0 with p = 1
    vals = np.memmap(tmp_path / "train_000000.vals", np.uint8, "r+").reshape(-1, SEQ, 4)
    vals[1] = np.array([2, 1, 1, 0], np.uint8)  # counts of other draws, same total
    ids.flush(), vals.flush()
    for sample in (0, 1):
        row = reader.read(0, sample)
        assert rules_pass(row) and not checksum_ok(sample, row)
    assert not checksum_ok(1, reader.read(0, 2))  # a row moved to another sample's place
    top1 = manifest(1, samples=2, mode="topk", value_dtype="uint8", slots=1)
    (tmp_path / "u8").mkdir()
    CacheFiles.create(tmp_path / "u8", top1)
    unwritten = CacheFiles(tmp_path / "u8", top1).read(0, 1)
    weights, tail = decode_units(unwritten.vals)
    assert bad_rows(unwritten.ids, weights, tail, 500, 0.0) == []
    assert not checksum_ok(1, unwritten)


def test_a_nan_in_a_float_row_is_refused():
    ids = np.array([[[1, 2]]])
    weights, tail = torch.tensor([[[0.5, float("nan")]]]), torch.tensor([[0.1]])
    assert bad_rows(ids, weights, tail, 10, 1e-3) == [((0, 0), "a NaN probability")]


def test_missing_parts_are_generated_in_order_without_a_list_of_all(tmp_path, monkeypatch):
    monkeypatch.setattr(progress_module, "MISSING_CHUNK", 7)  # many chunk boundaries
    total = 1000
    log = ProgressLog(tmp_path, "w")
    written = set(np.random.default_rng(0).choice(total, 600, replace=False).tolist())
    for part in sorted(written):
        log.append(part)
    log.close()
    progress = Progress(tmp_path, total)
    progress.refresh()
    for start, step in ((0, 1), (1, 4), (3, 4), (5, 13)):
        want = [p for p in range(start, total, step) if p not in written]
        assert list(progress.missing_every(start, step)) == want
    assert progress.writer_of(sorted(written)[5]) == "w"
    assert progress.writer_of(next(progress.missing_every(0, 1))) is None
