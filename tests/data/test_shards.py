"""Token shards and the sampler: round trip, manifest checks, deterministic global order."""

import json

import numpy as np
import pytest

from fbi.config import DataConfig
from fbi.data.prepare import build_shards, ensure_shards
from fbi.data.sampler import GlobalSampler
from fbi.data.shards import ShardCorruption, TokenShards, token_dtype
from fbi.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def built(tmp_path_factory, corpus, tokenizer_dir):
    tok = load_tokenizer(str(tokenizer_dir))
    cfg = DataConfig(name="t", corpus=None, files=[str(corpus / "*.txt")], val_fraction=0.05,
                     shard_tokens=4000, seq_len=16)
    out = tmp_path_factory.mktemp("shards") / "s"
    manifest = build_shards(cfg, tok, out, tmp_path_factory.mktemp("cache"))
    return tok, cfg, out, manifest


def test_stream_is_the_tokenized_documents(built, corpus):
    tok, cfg, out, manifest = built
    docs = [p.read_text() for p in sorted(corpus.glob("*.txt"))]
    expected = sorted(len(ids) + 1 for ids in tok.encode(docs))
    stream = np.concatenate(
        [np.fromfile(out / s.file, dtype=manifest.dtype) for split in ("train", "val")
         for s in manifest.splits[split]]
    )
    assert manifest.dtype == "uint16" and token_dtype(70_000) == np.uint32
    ends = np.flatnonzero(stream == tok.eos_id)
    lengths = np.diff(np.concatenate([[-1], ends]))
    assert sorted(lengths.tolist()) == expected
    assert manifest.tokens("val") == int(len(stream) * 0.05)
    assert all(s.tokens <= 4000 for s in manifest.splits["train"])
    assert len(manifest.splits["train"]) > 1


def test_samples_are_contiguous_slices(built):
    _, cfg, out, manifest = built
    data = TokenShards(out, "train", seq_len=16)
    first = np.fromfile(out / manifest.splits["train"][0].file, dtype=manifest.dtype)
    np.testing.assert_array_equal(data[1], first[16:33])
    assert data.batch([0, 1]).shape == (2, 17)
    per_shard = [(s.tokens - 1) // 16 for s in manifest.splits["train"]]
    assert data.num_samples == sum(per_shard)
    last = np.fromfile(out / manifest.splits["train"][-1].file, dtype=manifest.dtype)
    np.testing.assert_array_equal(data[data.num_samples - 1], last[(per_shard[-1] - 1) * 16:][:17])


def test_corrupt_truncated_and_foreign_shards_are_refused(built, tmp_path, tokenizer_dir):
    import shutil

    tok, cfg, out, manifest = built
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shard = copy / manifest.splits["train"][0].file
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(ShardCorruption, match="checksum"):
        TokenShards(copy, "train", 16)
    TokenShards(copy, "train", 16, verify=False)  # size still right: only the hash catches it
    shard.write_bytes(bytes(raw[:-2]))
    with pytest.raises(ShardCorruption, match="truncated"):
        TokenShards(copy, "train", 16, verify=False)
    manifest_file = copy / "manifest.json"
    meta = json.loads(manifest_file.read_text())
    meta["tokenizer_fingerprint"] = "0000"
    manifest_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="tokenized with"):
        ensure_shards(DataConfig(corpus=None, shards_dir=str(copy)), tok, tmp_path)


def test_global_order_is_a_permutation_per_epoch_and_world_size_free():
    sampler = GlobalSampler(num_samples=10, seed=3)
    epoch0 = [sampler.sample_id(k) for k in range(10)]
    epoch1 = [sampler.sample_id(k) for k in range(10, 20)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(10))
    assert epoch0 != epoch1
    # One global batch of 8: (world 1, micro 4, accum 2) and (world 2, micro 2, accum 2)
    # cover the same sample ids.
    one = [i for a in range(2) for i in sampler.micro_batch_ids(4, 4, a, 0, 1)]
    two = [i for a in range(2) for r in range(2) for i in sampler.micro_batch_ids(4, 2, a, r, 2)]
    assert sorted(one) == sorted(two) == sorted(sampler.sample_id(k) for k in range(4, 12))
    assert GlobalSampler(10, 3).sample_id(13) == sampler.sample_id(13)
