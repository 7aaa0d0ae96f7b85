"""Preparation as a job of workers: the same shards from 1 or 2 workers, identical bytes
after a worker dies mid-file, and corpora that are token ids already."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from fbi.config import ConfigError, DataConfig
from fbi.data import shards as shards_module
from fbi.data.prepare import ensure_shards, prepare, source_key
from fbi.data.shards import Manifest, TokenShards
from fbi.data.tokenizer import load_tokenizer
from fbi_testing import REPO, wikitext_lines


def corpus(directory, files: int = 5, docs: int = 30):
    """``files`` jsonl files of ``docs`` WikiText documents each."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = wikitext_lines(200_000)
    chunks = np.array_split(np.arange(len(lines)), files * docs)
    for f in range(files):
        rows = ["\n".join(lines[i] for i in chunks[f * docs + d]) for d in range(docs)]
        (directory / f"part{f}.jsonl").write_text("".join(json.dumps({"text": r}) + "\n"
                                                          for r in rows))
    return directory


def folder_bytes(directory) -> dict[str, bytes]:
    """Every shard, side file and the manifest (progress records hold timings: left out)."""
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


def test_two_workers_write_the_same_shards_as_one(tmp_path, tokenizer_dir):
    """One worker in-process, and two `python -m fbi data prepare` processes at once, each
    taking every other file; the last to finish writes the manifest."""
    src = corpus(tmp_path / "corpus")
    overrides = ["teacher=none", f"tokenizer.path={tokenizer_dir}", "data=files",
                 f"data.files=[{src}/*.jsonl]", "data.shard_tokens=5000", "data.val_fraction=0.1",
                 f"cache_dir={tmp_path / 'cache'}"]
    tok = load_tokenizer(str(tokenizer_dir))
    cfg = DataConfig(name="files", corpus=None, files=[f"{src}/*.jsonl"], shard_tokens=5000,
                     val_fraction=0.1, shards_dir=str(tmp_path / "one"))
    prepare(cfg, tok, tmp_path / "one", tmp_path, source_key(cfg, tok, tmp_path))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-m", "fbi", "data", "prepare", "--worker", str(w),
                               "--workers", "2", *overrides, f"data.shards_dir={tmp_path / 'two'}"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for w in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out))
    assert [r["files"] for r in results] == [3, 2]
    assert all(r["tokens_per_s"] > 0 for r in results)
    assert any(r["manifest"] for r in results)
    one, two = folder_bytes(tmp_path / "one"), folder_bytes(tmp_path / "two")
    assert one.keys() == two.keys() and len(one) > 10
    assert {k for k in one if one[k] != two[k]} == set()
    assert Manifest.load(tmp_path / "two").tokens("val") > 0


def test_a_worker_that_dies_mid_file_restarts_to_identical_bytes(tmp_path, tokenizer_dir,
                                                                  monkeypatch):
    src = corpus(tmp_path / "corpus", files=3)
    tok = load_tokenizer(str(tokenizer_dir))
    cfg = DataConfig(name="t", corpus=None, files=[f"{src}/*.jsonl"], shard_tokens=3000)
    key = source_key(cfg, tok, tmp_path)
    prepare(cfg, tok, tmp_path / "clean", tmp_path, key)

    real_write, calls = shards_module.ShardWriter.write, []

    def dying_write(self, tokens):
        calls.append(1)
        if len(calls) == 135:  # 3 writes a document, 30 documents a file: mid second file
            raise KeyboardInterrupt("killed")
        real_write(self, tokens)

    monkeypatch.setattr(shards_module.ShardWriter, "write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, tok, tmp_path / "killed", tmp_path, key)
    monkeypatch.setattr(shards_module.ShardWriter, "write", real_write)
    done = sorted(p.name for p in (tmp_path / "killed" / "progress").glob("d*.json"))
    assert done == ["d000000.json"]
    assert any((tmp_path / "killed").glob("d000001_*.bin"))  # the half-written file
    result = prepare(cfg, tok, tmp_path / "killed", tmp_path, key)
    assert result["files"] == 2  # the first file was not tokenized again
    assert folder_bytes(tmp_path / "killed") == folder_bytes(tmp_path / "clean")


def test_a_folder_with_another_preparation_is_refused(tmp_path, tokenizer_dir):
    src = corpus(tmp_path / "corpus", files=2)
    tok = load_tokenizer(str(tokenizer_dir))
    cfg = DataConfig(name="t", corpus=None, files=[f"{src}/*.jsonl"])
    prepare(cfg, tok, tmp_path / "s", tmp_path, source_key(cfg, tok, tmp_path))
    other = DataConfig(name="t", corpus=None, files=[f"{src}/*.jsonl"], separator="<eos>")
    with pytest.raises(ConfigError, match="holds a preparation with other sources or settings"):
        prepare(other, tok, tmp_path / "s", tmp_path, source_key(other, tok, tmp_path))


def megatron_pair(stem, docs: list[np.ndarray]) -> None:
    """A Megatron-LM indexed dataset written from its format: ``.bin`` the concatenated ids
    (uint16, code 8); ``.idx`` = magic, version 1, dtype code, sequence and document counts,
    int32 sequence lengths, int64 byte pointers, int64 document indices (0, then each
    document's end in sequences). Each document here is two sequences, as a sentence-split
    corpus would be."""
    sequences = [part for d in docs for part in np.array_split(d, 2)]
    lengths = np.array([len(s) for s in sequences], dtype=np.int32)
    pointers = np.concatenate([[0], np.cumsum(lengths)[:-1] * 2]).astype(np.int64)
    doc_index = np.arange(0, len(sequences) + 1, 2, dtype=np.int64)
    np.concatenate(sequences).astype(np.uint16).tofile(f"{stem}.bin")
    with open(f"{stem}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8))
        f.write(struct.pack("<Q", len(sequences)) + struct.pack("<Q", len(doc_index)))
        f.write(lengths.tobytes() + pointers.tobytes() + doc_index.tobytes())


@pytest.mark.parametrize("kind", ["jsonl", "npy", "npy2d", "bin", "megatron"])
def test_token_ids_come_in_without_a_tokenizer_round_trip(tmp_path, tokenizer_dir, kind):
    """Ids already made: the shards hold them as they are (with no separator added: they
    carry their own), in file and row order; the fingerprint is the named tokenizer's."""
    tok = load_tokenizer(str(tokenizer_dir))
    rng = np.random.default_rng(0)
    files = [[rng.integers(0, tok.vocab_size, rng.integers(50, 400)) for _ in range(12)]
             for _ in range(3)]
    extra = {}
    for f, docs in enumerate(files):
        stem = tmp_path / "in" / f"part{f}"
        stem.parent.mkdir(exist_ok=True)
        if kind == "jsonl":
            stem.with_suffix(".jsonl").write_text("".join(
                json.dumps({"token_ids": d.tolist(), "meta": 1}) + "\n" for d in docs))
            extra = {"token_field": "token_ids"}
        elif kind == "npy":  # a 1-D array per file: one document
            files[f] = [np.concatenate(docs)]
            np.save(stem.with_suffix(".npy"), files[f][0].astype(np.int32))
        elif kind == "npy2d":  # a row per document, e.g. fixed-length chunks
            files[f] = [d[:50] for d in docs]
            np.save(stem.with_suffix(".npy"), np.stack(files[f]).astype(np.uint16))
        elif kind == "bin":
            files[f] = [np.concatenate(docs)]
            files[f][0].astype(np.uint32).tofile(stem.with_suffix(".bin"))
            extra = {"token_dtype": "uint32"}
        else:
            megatron_pair(stem, docs)
    ext = {"jsonl": "jsonl", "npy": "npy", "npy2d": "npy", "bin": "bin", "megatron": "bin"}[kind]
    cfg = DataConfig(name="t", corpus=None, files=[f"{tmp_path}/in/*.{ext}"], separator="none",
                     val_fraction=0.2, seq_len=8, shards_dir=str(tmp_path / "s"), **extra)
    out = ensure_shards(cfg, tok, tmp_path / "cache")
    manifest = Manifest.load(out)
    assert manifest.tokenizer_fingerprint == tok.fingerprint
    got = {}
    for split in ("train", "val"):
        table = manifest.document_table(out, split)
        stream = np.concatenate([np.fromfile(out / s.file, dtype=manifest.dtype)
                                 for s in manifest.splits[split]])
        expected = np.concatenate([files[f][row] for f, row, _ in table])
        np.testing.assert_array_equal(stream, expected)
        got[split] = {(int(f), int(row)) for f, row, _ in table}
    assert got["train"] | got["val"] == {(f, r) for f in range(3) for r in range(len(files[f]))}
    assert got["val"] and not got["train"] & got["val"]
    TokenShards(out, "train", 8).check_ids(tok.vocab_size)


@pytest.mark.parametrize("kind", ["jsonl", "npy"])
def test_ids_beyond_the_vocabulary_are_refused_with_file_and_position(tmp_path, tokenizer_dir,
                                                                      kind):
    tok = load_tokenizer(str(tokenizer_dir))
    docs = [np.arange(100) % tok.vocab_size for _ in range(4)]
    docs[2][37] = tok.vocab_size + 3
    if kind == "jsonl":
        path = tmp_path / "ids.jsonl"
        path.write_text("".join(json.dumps({"token_ids": d.tolist()}) + "\n" for d in docs))
        cfg = DataConfig(name="t", corpus=None, files=[str(path)], token_field="token_ids")
        where = "document 2, position 37"
    else:
        path = tmp_path / "ids.npy"
        np.save(path, np.stack(docs))
        cfg = DataConfig(name="t", corpus=None, files=[str(path)])
        where = "document 2, position 37"
    with pytest.raises(ConfigError, match=f"data.files: {path}, {where} holds token id "
                                          f"{tok.vocab_size + 3}, outside the vocabulary"):
        ensure_shards(cfg, tok, tmp_path / "cache")


def test_a_flat_bin_without_dtype_or_index_is_refused_naming_the_setting(tmp_path, tokenizer_dir):
    np.arange(100, dtype=np.uint16).tofile(tmp_path / "ids.bin")
    cfg = DataConfig(name="t", corpus=None, files=[str(tmp_path / "ids.bin")])
    with pytest.raises(ConfigError, match="data.token_dtype: .*ids.bin is a flat array"):
        ensure_shards(cfg, load_tokenizer(str(tokenizer_dir)), tmp_path / "cache")


def test_the_command_refuses_bad_input_in_one_paragraph(tmp_path, tokenizer_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "fbi", "data", "prepare", "teacher=none",
         f"tokenizer.path={tokenizer_dir}", "data=files", f"data.files=[{tmp_path}/none*.jsonl]"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"python -m fbi data: data.files: no file matches ['{tmp_path}/none*.jsonl']" \
        in proc.stderr
