"""Damaged inputs are refused, never silently truncated: each reader checks sizes, headers and
indices against each other before it reads, and ``python -m fbi data`` turns the refusal into
one paragraph naming the file (exit 2, no traceback) that leaves no manifest and no record of
the damaged file behind."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from fbi.cli import main
from fbi_testing import REPO

sys.path.insert(0, str(REPO / "tests" / "data"))
from test_prepare import megatron_pair  # noqa: E402

VOCAB = 512  # the session tokenizer's


def docs(count: int = 6, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, rng.integers(100, 600)) for _ in range(count)]


def refused(capsys, tmp_path, tokenizer_dir, path, *extra) -> str:
    """Run ``data prepare`` on ``path``; require the refusal and that nothing a later run
    would trust was written. Returns the refusal's line."""
    out = tmp_path / "shards"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["data", "prepare", "teacher=none", f"tokenizer.path={tokenizer_dir}",
              "data=files", f"data.files=[{path}]", f"data.shards_dir={out}",
              f"cache_dir={tmp_path / 'cache'}", *extra])
    assert exit_.value.code == 2
    stdout, stderr = capsys.readouterr()
    assert stdout == "" and "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    # the file named: the damaged one (a Megatron pair: its .bin or its .idx)
    assert lines[0].startswith("python -m fbi data: ") and str(path.with_suffix("")) in lines[0]
    assert not (out / "manifest.json").exists()
    assert not list((out / "progress").glob("d*.json")) if out.exists() else True
    return lines[0]


def write_idx(stem, code: int, lengths, pointers, doc_index) -> None:
    with open(f"{stem}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code))
        f.write(struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(doc_index)))
        f.write(np.asarray(lengths, np.int32).tobytes() + np.asarray(pointers, np.int64).tobytes()
                + np.asarray(doc_index, np.int64).tobytes())


@pytest.fixture
def megatron(tmp_path):
    stem = tmp_path / "in" / "corpus"
    stem.parent.mkdir()
    megatron_pair(stem, docs())
    return stem


def cut(path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def test_a_megatron_bin_shorter_than_its_index_is_refused(megatron, tmp_path, tokenizer_dir,
                                                          capsys):
    """The issue's case: 100 tokens missing from the last document were dropped silently."""
    bin_ = megatron.with_suffix(".bin")
    cut(bin_, bin_.stat().st_size - 200)
    line = refused(capsys, tmp_path, tokenizer_dir, bin_)
    assert "outside" in line and str(megatron.with_suffix(".idx")) in line and "cut short" in line


def test_a_megatron_bin_with_trailing_bytes_is_refused(megatron, tmp_path, tokenizer_dir, capsys):
    bin_ = megatron.with_suffix(".bin")
    with open(bin_, "ab") as f:
        f.write(np.arange(10, dtype=np.uint16).tobytes())
    assert "20 trailing bytes" in refused(capsys, tmp_path, tokenizer_dir, bin_)


def test_a_megatron_bin_of_odd_length_is_refused(megatron, tmp_path, tokenizer_dir, capsys):
    bin_ = megatron.with_suffix(".bin")
    with open(bin_, "ab") as f:
        f.write(b"\x01")
    assert "not a whole array of the uint16 ids" in refused(capsys, tmp_path, tokenizer_dir, bin_)


@pytest.mark.parametrize("size", [0, 5, 9, 17, 18, 25, 33])
def test_a_megatron_index_cut_inside_its_header_is_refused(megatron, tmp_path, tokenizer_dir,
                                                           capsys, size):
    cut(megatron.with_suffix(".idx"), size)
    line = refused(capsys, tmp_path, tokenizer_dir, megatron.with_suffix(".bin"))
    assert str(megatron.with_suffix(".idx")) in line
    assert "shorter than the 34-byte header" in line


@pytest.mark.parametrize("drop", [1, 8, 100])
def test_a_megatron_index_cut_inside_its_tables_is_refused(megatron, tmp_path, tokenizer_dir,
                                                           capsys, drop):
    idx = megatron.with_suffix(".idx")
    cut(idx, idx.stat().st_size - drop)
    line = refused(capsys, tmp_path, tokenizer_dir, megatron.with_suffix(".bin"))
    assert str(idx) in line and f"{drop} bytes are missing" in line


def test_a_megatron_document_index_past_the_end_is_refused(tmp_path, tokenizer_dir, capsys):
    stem = tmp_path / "corpus"
    ids = docs(3)
    np.concatenate(ids).astype(np.uint16).tofile(f"{stem}.bin")
    lengths = [len(d) for d in ids]
    write_idx(stem, 8, lengths, np.cumsum([0] + lengths[:-1]) * 2, [0, 1, 5, 3])
    line = refused(capsys, tmp_path, tokenizer_dir, stem.with_suffix(".bin"))
    assert "document index entry 2 is 5, outside 0..3 sequences" in line


def test_a_megatron_sequence_pointer_past_the_end_is_refused(tmp_path, tokenizer_dir, capsys):
    stem = tmp_path / "corpus"
    ids = docs(3)
    np.concatenate(ids).astype(np.uint16).tofile(f"{stem}.bin")
    lengths = [len(d) for d in ids]
    pointers = np.cumsum([0] + lengths[:-1]) * 2
    pointers[1] = 10**9  # an index past the end of the .bin
    write_idx(stem, 8, lengths, pointers, [0, 1, 2, 3])
    assert "puts sequence 1" in refused(capsys, tmp_path, tokenizer_dir, stem.with_suffix(".bin"))


@pytest.mark.parametrize("code,name", [(6, "float64"), (7, "float32")])
def test_a_megatron_float_dtype_is_refused_like_a_float_npy(tmp_path, tokenizer_dir, capsys,
                                                            code, name):
    """152.5 used to become token 152."""
    stem = tmp_path / "corpus"
    values = np.array([152.5, 3.0, 7.25, 9.0], dtype=name)
    values.tofile(f"{stem}.bin")
    write_idx(stem, code, [4], [0], [0, 1])
    line = refused(capsys, tmp_path, tokenizer_dir, stem.with_suffix(".bin"))
    assert f"holds {name} values (dtype code {code}), not token ids" in line


def test_an_empty_megatron_bin_is_refused(megatron, tmp_path, tokenizer_dir, capsys):
    cut(megatron.with_suffix(".bin"), 0)
    assert "is empty (0 bytes)" in refused(capsys, tmp_path, tokenizer_dir,
                                            megatron.with_suffix(".bin"))


def test_an_empty_npy_is_refused(tmp_path, tokenizer_dir, capsys):
    path = tmp_path / "ids.npy"
    path.write_bytes(b"")
    assert "is empty (0 bytes)" in refused(capsys, tmp_path, tokenizer_dir, path)


@pytest.mark.parametrize("where", ["header", "data", "trailing", "no_rows"])
def test_a_damaged_npy_is_refused(tmp_path, tokenizer_dir, capsys, where):
    path = tmp_path / "ids.npy"
    np.save(path, np.concatenate(docs(4, 1)).astype(np.uint16))
    size = path.stat().st_size
    if where == "header":
        cut(path, 40)
        expected = "is not a readable .npy file"
    elif where == "data":
        cut(path, size - 7)
        expected = "7 bytes are missing"
    elif where == "trailing":
        with open(path, "ab") as f:
            f.write(b"\0" * 6)
        expected = "6 trailing bytes"
    else:
        np.save(path, np.zeros((0, 8), np.int32))
        expected = "no token ids at all"
    assert expected in refused(capsys, tmp_path, tokenizer_dir, path)


def test_a_float_npy_is_refused(tmp_path, tokenizer_dir, capsys):
    path = tmp_path / "ids.npy"
    np.save(path, np.array([152.5, 3.0]))
    assert "1-D float64 array" in refused(capsys, tmp_path, tokenizer_dir, path)


@pytest.mark.parametrize("size", [0, 11])
def test_an_empty_or_odd_flat_bin_is_refused(tmp_path, tokenizer_dir, capsys, size):
    path = tmp_path / "ids.bin"
    path.write_bytes(np.arange(6, dtype=np.uint16).tobytes()[:size])
    line = refused(capsys, tmp_path, tokenizer_dir, path, "data.token_dtype=uint16")
    assert ("is empty (0 bytes)" if size == 0 else "(11 bytes) is not a whole array") in line


def test_a_latin1_jsonl_is_refused(tmp_path, tokenizer_dir, capsys):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(json.dumps({"text": "caf\u00e9"}, ensure_ascii=False).encode("latin-1") + b"\n")
    assert "is not UTF-8 text (byte 13" in refused(capsys, tmp_path, tokenizer_dir, path)


def test_a_truncated_jsonl_is_refused(tmp_path, tokenizer_dir, capsys):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"text": "a whole row"}) + "\n" + '{"text": "cut he')
    assert "(line 2) is not JSON" in refused(capsys, tmp_path, tokenizer_dir, path)


def test_a_truncated_parquet_is_refused(tmp_path, tokenizer_dir, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": ["row %d" % i for i in range(1000)]}), path)
    cut(path, path.stat().st_size // 2)
    assert "could not be read as parquet" in refused(capsys, tmp_path, tokenizer_dir, path)


@pytest.mark.parametrize("verb", ["verify", "convert"])
def test_verify_and_convert_refuse_a_missing_folder(tmp_path, capsys, verb):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["data", verb, str(tmp_path / "nowhere")])
    assert exit_.value.code == 2
    line = capsys.readouterr().err.strip()
    assert line == (f"python -m fbi data: data.shards_dir: {tmp_path / 'nowhere'} is not a "
                    "folder; name a folder of prepared shards (python -m fbi data prepare "
                    "writes one)")


def test_the_boundary_has_no_traceback_unless_asked(megatron, tmp_path, tokenizer_dir):
    """From the command line: exit 2 and one line; FBI_DEBUG=1 shows the traceback."""
    bin_ = megatron.with_suffix(".bin")
    cut(bin_, bin_.stat().st_size - 200)
    argv = [sys.executable, "-m", "fbi", "data", "prepare", "teacher=none",
            f"tokenizer.path={tokenizer_dir}", "data=files", f"data.files=[{bin_}]",
            f"data.shards_dir={tmp_path / 's'}", f"cache_dir={tmp_path / 'cache'}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("FBI_DEBUG", None)
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and str(bin_) in proc.stderr
    proc = subprocess.run(argv, cwd=REPO, env={**env, "FBI_DEBUG": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr
