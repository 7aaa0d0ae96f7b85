"""Token shards and the sampler: round trip, manifest checks, deterministic global order."""

import dataclasses
import json

import numpy as np
import pytest

from fbi.config import DataConfig
from fbi.data.prepare import build_shards, ensure_shards, separator_ids, source_key
from fbi.data.sampler import GlobalSampler
from fbi.data.shards import Manifest, ShardCorruption, TokenShards, token_dtype
from fbi.data.tokenizer import load_tokenizer
from fbi_testing import wikitext_lines


def documents(n: int = 120) -> list[str]:
    """WikiText-2 articles cut into ``n`` documents of uneven length."""
    lines = wikitext_lines(150_000)
    cuts = np.linspace(0, len(lines), n + 1).astype(int)
    return ["\n".join(lines[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]


@pytest.fixture(scope="module")
def built(tmp_path_factory, tokenizer_dir):
    tok = load_tokenizer(str(tokenizer_dir))
    corpus = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents()))
    cfg = DataConfig(name="t", corpus=None, files=[str(corpus)], val_fraction=0.05,
                     shard_tokens=4000, seq_len=16)
    out = tmp_path_factory.mktemp("shards") / "s"
    key = source_key(cfg, tok, tmp_path_factory.mktemp("cache"))
    manifest = build_shards(cfg, tok, out, tmp_path_factory.mktemp("cache"), key)
    return tok, cfg, out, manifest


def split_tokens(out, manifest, split):
    return np.concatenate([np.fromfile(out / s.file, dtype=manifest.dtype)
                           for s in manifest.splits[split]])


def test_splits_hold_whole_documents(built):
    """Each split is exactly its documents, tokenized, each followed by EOS; the two sets of
    document ids are disjoint and cover the corpus; validation is the fewest whole documents
    reaching val_fraction."""
    tok, cfg, out, manifest = built
    docs = documents()
    ids = {split: manifest.documents[split] for split in ("train", "val")}
    assert not set(ids["train"]) & set(ids["val"])
    assert sorted(ids["train"] + ids["val"]) == list(range(len(docs)))
    for split in ("train", "val"):
        expected = [t for i in ids[split] for t in tok.encode([docs[i]])[0] + [tok.eos_id]]
        np.testing.assert_array_equal(split_tokens(out, manifest, split), expected)
    total = manifest.tokens("train") + manifest.tokens("val")
    first_val_doc = len(tok.encode([docs[ids["val"][0]]])[0]) + 1
    assert manifest.tokens("val") >= 0.05 * total > manifest.tokens("val") - first_val_doc
    assert manifest.dtype == "uint16" and token_dtype(70_000) == np.uint32
    assert all(s.tokens <= 4000 for s in manifest.splits["train"])
    assert len(manifest.splits["train"]) > 1


def test_separator_choices(built, tmp_path):
    tok, cfg, _, _ = built
    assert separator_ids(cfg, tok) == ([], [tok.eos_id])
    named = dataclasses.replace(cfg, separator="<eos>")
    assert separator_ids(named, tok) == ([], [tok.token_id("<eos>")])
    with pytest.raises(ValueError, match="data.separator: bos_eos"):
        separator_ids(dataclasses.replace(cfg, separator="bos_eos"), tok)  # no BOS in it
    with pytest.raises(ValueError, match="not a token"):
        separator_ids(dataclasses.replace(cfg, separator="<nope>"), tok)


def test_changed_source_is_retokenized(tmp_path, tokenizer_dir):
    """The cache folder is keyed by the sources: editing a file gives new shards."""
    tok = load_tokenizer(str(tokenizer_dir))
    text, other_text = tmp_path / "a.txt", tmp_path / "b.txt"
    text.write_text("\n".join(documents(4)[:2]))
    other_text.write_text(documents(4)[3])
    cfg = DataConfig(name="t", corpus=None, files=[str(tmp_path / "*.txt")], seq_len=8)
    first = ensure_shards(cfg, tok, tmp_path / "cache")
    assert ensure_shards(cfg, tok, tmp_path / "cache") == first  # unchanged: reused
    text.write_text("\n".join(documents(4)[2:]))
    second = ensure_shards(cfg, tok, tmp_path / "cache")
    assert second != first
    stream = np.concatenate([split_tokens(second, Manifest.load(second), s)
                             for s in ("train", "val")])
    assert len(stream) == sum(len(ids) + 1 for ids in tok.encode(
        [text.read_text(), other_text.read_text()]))
    other = ensure_shards(dataclasses.replace(cfg, val_fraction=0.2), tok, tmp_path / "cache")
    assert other not in (first, second)


def test_validation_split_is_verified(built, tmp_path):
    import shutil

    tok, cfg, out, manifest = built
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shard = copy / manifest.splits["val"][0].file
    raw = bytearray(shard.read_bytes())
    raw[0:2] = (tok.vocab_size + 5).to_bytes(2, "little")
    shard.write_bytes(bytes(raw))
    with pytest.raises(ShardCorruption, match="checksum"):
        TokenShards(copy, "val", 16)
    with pytest.raises(ShardCorruption, match="outside the vocabulary"):
        TokenShards(copy, "val", 16, verify=False).check_ids(tok.vocab_size)


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


@pytest.mark.parametrize("text", ["{not json", '{"splits": 3}', "[]"])
def test_a_garbage_manifest_is_refused_naming_the_folder(tmp_path, text):
    from fbi.config import ConfigError

    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(ConfigError, match="data.shards_dir: .*manifest.json is not a shard manifest"):
        Manifest.load(tmp_path)


def test_one_document_and_a_vocabulary_below_the_characters_are_refused(tmp_path, tokenizer_dir):
    from fbi.config import ConfigError
    from fbi.data.tokenizer import train_sentencepiece

    with pytest.raises(ConfigError, match="tokenizer.vocab_size: sentencepiece cannot train 40"):
        train_sentencepiece(wikitext_lines(20_000), 40, tmp_path / "sp" / "t.model")
    (tmp_path / "one.txt").write_text("\n".join(wikitext_lines(5_000)))
    cfg = DataConfig(name="t", corpus=None, files=[str(tmp_path / "one.txt")])
    with pytest.raises(ConfigError, match="data: 1 document"):
        ensure_shards(cfg, load_tokenizer(str(tokenizer_dir)), tmp_path / "cache")
