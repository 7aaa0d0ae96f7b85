"""Every reader of data files against damage at many places (fixed seed): truncated at random
offsets, bytes flipped, a range zeroed, the file emptied, the dtype swapped. Each case either
reads back documents of the original shape (a flipped id inside a raw array is undetectable
without a checksum, but never shortens or drops a document; a flat ``.bin`` records no
length, so one cut at a whole id reads as its exact prefix) or is refused with a ConfigError
naming the file: never another exception, never a silent truncation."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from fbi.config import ConfigError, DataConfig
from fbi.data.readers import read_documents
from fbi_testing import REPO

sys.path.insert(0, str(REPO / "tests" / "data"))
from test_prepare import megatron_pair  # noqa: E402

READER = {"text": "text", "jsonl": "json", "npy": "npy", "npy2d": "npy", "bin": "bin",
          "megatron_bin": "bin", "megatron_idx": "bin"}
KINDS = ["text", "jsonl", "npy", "npy2d", "bin", "megatron_bin", "megatron_idx"]
DAMAGES = [("truncate", i) for i in range(6)] + [("flip", i) for i in range(6)] + \
    [("zero", i) for i in range(3)] + [("empty", 0), ("dtype", 0)]


def make(kind: str, directory) -> tuple[str, str, DataConfig, list]:
    """(file to read, file to damage, config, documents written)."""
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 500, rng.integers(20, 80)) for _ in range(5)]
    cfg = DataConfig(name="t", corpus=None, files=["x"])
    if kind == "text":
        path = directory / "a.txt"
        path.write_text("caf\u00e9 " * 50, encoding="utf-8")
        return str(path), str(path), cfg, ["caf\u00e9 " * 50]
    if kind == "jsonl":
        path = directory / "a.jsonl"
        rows = [f"row {i} \u00e9" * 5 for i in range(5)]
        path.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
        return str(path), str(path), cfg, rows
    if kind in ("npy", "npy2d"):
        path = directory / "a.npy"
        arr = np.concatenate(docs) if kind == "npy" else np.stack([d[:20] for d in docs])
        np.save(path, arr.astype(np.uint16))
        return str(path), str(path), cfg, [arr] if kind == "npy" else list(arr)
    if kind == "bin":
        path = directory / "a.bin"
        np.concatenate(docs).astype(np.uint16).tofile(path)
        cfg.token_dtype = "uint16"
        return str(path), str(path), cfg, [np.concatenate(docs)]
    megatron_pair(directory / "a", docs)
    target = directory / ("a.bin" if kind == "megatron_bin" else "a.idx")
    return str(directory / "a.bin"), str(target), cfg, docs


def damage(path: str, how: str, rng: np.random.Generator) -> bool:
    """Damage ``path`` in place; False where the damage does not apply to its kind."""
    data = bytearray(open(path, "rb").read())
    if how == "truncate":
        data = data[: int(rng.integers(0, len(data)))]
    elif how == "flip":
        at = int(rng.integers(0, len(data)))
        data[at] ^= 1 << int(rng.integers(0, 8))
    elif how == "zero":
        at, n = int(rng.integers(0, len(data))), int(rng.integers(1, 16))
        data[at: at + n] = bytes(len(data[at: at + n]))
    elif how == "empty":
        data = bytearray()
    elif path.endswith(".npy"):  # dtype: the header says float16, the bytes stay
        data = data.replace(b"'<u2'", b"'<f2'", 1)
    elif path.endswith(".idx"):  # dtype: Megatron's code 7, float32
        data[17] = 7
    else:
        return False
    open(path, "wb").write(bytes(data))
    return True


def shape(docs) -> list:
    return [len(d) if not isinstance(d, str) else None for d in docs]


@pytest.mark.parametrize("kind", KINDS)
def test_each_damaged_file_reads_whole_or_is_refused(tmp_path, kind):
    outcomes = {"refused": 0, "read": 0}
    for n, (how, case) in enumerate(DAMAGES):
        directory = tmp_path / f"{how}{case}"
        directory.mkdir()
        path, target, cfg, written = make(kind, directory)
        if not damage(target, how, np.random.default_rng([KINDS.index(kind), n])):
            continue
        try:
            got = [doc for _, doc in read_documents(cfg, path, READER[kind])]
        except ConfigError as err:
            assert str(target) in str(err) or str(path) in str(err), err
            outcomes["refused"] += 1
            continue
        if kind == "bin" and how == "truncate":  # a flat array records no length: a cut at a
            # whole id cannot be told from a shorter file (a Megatron pair or .npy can)
            np.testing.assert_array_equal(got[0], written[0][: len(got[0])])
            outcomes["read"] += 1
            continue
        assert shape(got) == shape(written), (how, case)
        if kind in ("text", "jsonl"):  # text changes only by the flipped/zeroed characters
            assert len(got) == len(written)
        outcomes["read"] += 1
    assert outcomes["refused"] >= 3, outcomes  # empty and the cuts, at least
