"""Token shards: round trip, the split rule, cheap start-up checks, verification on demand,
format-1 shards."""

import dataclasses
import json
import shutil

import numpy as np
import pytest

from fbi.config import ConfigError, DataConfig
from fbi.data.prepare import ensure_shards, held_out, prepare, separator_ids, source_key
from fbi.data.shards import Manifest, ShardCorruption, TokenShards, token_dtype, verify_checksums
from fbi.data.tokenizer import load_tokenizer
from fbi_testing import wikitext_lines


def documents(n: int = 120, chars: int = 150_000) -> list[str]:
    """WikiText-2 articles cut into ``n`` documents of uneven length."""
    lines = wikitext_lines(chars)
    cuts = np.linspace(0, len(lines), n + 1).astype(int)
    return ["\n".join(lines[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]


def write_jsonl(path, docs):
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory, tokenizer_dir):
    tok = load_tokenizer(str(tokenizer_dir))
    corpus = write_jsonl(tmp_path_factory.mktemp("docs") / "docs.jsonl", documents())
    cfg = DataConfig(name="t", corpus=None, files=[str(corpus)], val_fraction=0.05,
                     shard_tokens=4000, seq_len=16)
    cache = tmp_path_factory.mktemp("cache")
    out = tmp_path_factory.mktemp("shards") / "s"
    prepare(cfg, tok, out, cache, source_key(cfg, tok, cache))
    return tok, cfg, out, Manifest.load(out)


def split_tokens(out, manifest, split):
    return np.concatenate([np.fromfile(out / s.file, dtype=manifest.dtype)
                           for s in manifest.splits[split]])


def test_splits_hold_whole_documents(built):
    """Each split is exactly its documents in file order, tokenized, each followed by EOS;
    the side files name every row once, with the offset where its tokens begin; a
    document's split is the hash rule's, which draws about val_fraction of them."""
    tok, cfg, out, manifest = built
    docs = documents()
    tables = {s: np.asarray(manifest.document_table(out, s)) for s in ("train", "val")}
    rows = {s: tables[s][:, 1].tolist() for s in tables}
    assert sorted(rows["train"] + rows["val"]) == list(range(len(docs)))
    assert rows["val"] == np.flatnonzero(held_out(cfg, "docs.jsonl", np.arange(120))).tolist()
    assert 1 <= len(rows["val"]) <= 20  # 6 expected of 120 at 5%
    for split in ("train", "val"):
        encoded = [tok.encode([docs[i]])[0] + [tok.eos_id] for i in rows[split]]
        np.testing.assert_array_equal(split_tokens(out, manifest, split),
                                      [t for ids in encoded for t in ids])
        np.testing.assert_array_equal(tables[split][:, 2],
                                      np.cumsum([0] + [len(ids) for ids in encoded])[:-1])
    assert manifest.dtype == "uint16" and token_dtype(70_000) == np.uint32
    assert all(s.tokens <= 4000 for s in manifest.splits["train"])
    assert len(manifest.splits["train"]) > 1 and manifest.format == 2


def test_text_files_are_held_out_whole(tmp_path, tokenizer_dir):
    """Text files are one document each, never split by rows: the fewest whole files from
    the end of the split_seed order reaching val_fraction of the tokens are held out
    (computed here from the per-file token counts)."""
    tok = load_tokenizer(str(tokenizer_dir))
    texts = documents(6, 60_000)
    for i, text in enumerate(texts):
        (tmp_path / f"f{i}.txt").write_text(text)
    seed = 3
    cfg = DataConfig(name="t", corpus=None, files=[str(tmp_path / "*.txt")], val_fraction=0.3,
                     seq_len=8, split_seed=seed)
    lengths = np.array([len(tok.encode([t])[0]) + 1 for t in texts])
    order = np.random.default_rng(seed).permutation(6)[::-1]
    count = int(np.argmax(np.cumsum(lengths[order]) >= 0.3 * lengths.sum())) + 1
    expected_val = sorted(order[:count].tolist())
    assert count >= 2
    manifest = Manifest.load(ensure_shards(cfg, tok, tmp_path / "cache"))
    val_files = sorted(int(s.file[1:7]) for s in manifest.splits["val"])
    assert val_files == expected_val
    assert manifest.tokens("val") == lengths[expected_val].sum()


def test_separator_choices(built):
    tok, cfg, _, _ = built
    assert separator_ids(cfg, tok) == ([], [tok.eos_id])
    assert separator_ids(dataclasses.replace(cfg, separator="none"), tok) == ([], [])
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


def test_the_manifest_does_not_grow_with_the_documents(tmp_path, tokenizer_dir):
    """The same text as 50 or as 2,000 documents: manifests of the same size (to a few
    digits of the token counts); the boundaries are in the side files."""
    tok = load_tokenizer(str(tokenizer_dir))
    sizes, counts = [], []
    for n in (50, 2000):
        (tmp_path / f"c{n}").mkdir()
        corpus = write_jsonl(tmp_path / f"c{n}" / "docs.jsonl", documents(n, 100_000))
        cfg = DataConfig(name="t", corpus=None, files=[str(corpus)], val_fraction=0.1,
                         shard_tokens=10_000, seq_len=8, shards_dir=str(tmp_path / f"s{n}"))
        out = ensure_shards(cfg, tok, tmp_path / "cache")
        sizes.append((out / "manifest.json").stat().st_size)
        counts.append(sum(len(Manifest.load(out).document_table(out, s)) for s in ("train", "val")))
    assert counts == [50, 2000]
    assert abs(sizes[0] - sizes[1]) < 100


def test_a_start_checks_sizes_not_bytes_and_verify_finds_a_flipped_byte(built, tmp_path):
    tok, cfg, out, manifest = built
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert verify_checksums(copy) == []
    shard = copy / manifest.splits["train"][1].file
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 0xFF
    shard.write_bytes(bytes(raw))
    TokenShards(copy, "train", 16)  # a start does not read the shards: it opens
    with pytest.raises(ShardCorruption, match="checksum"):
        TokenShards(copy, "train", 16, verify=True)  # data.verify_checksums=true
    # Split over 3 "ranks": exactly one finds it.
    found = [verify_checksums(copy, rank, 3) for rank in range(3)]
    assert sorted(len(f) for f in found) == [0, 0, 1]
    assert "fails its sha256 checksum" in sum(found, [])[0]
    shard.write_bytes(bytes(raw[:-2]))
    with pytest.raises(ShardCorruption, match="truncated"):
        TokenShards(copy, "train", 16)
    meta = json.loads((copy / "manifest.json").read_text())
    meta["tokenizer_fingerprint"] = "0000"
    (copy / "manifest.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="tokenized with"):
        ensure_shards(DataConfig(corpus=None, shards_dir=str(copy)), tok, tmp_path)


def test_validation_ids_are_checked_where_evaluation_reads(built, tmp_path):
    tok, cfg, out, manifest = built
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shard = copy / manifest.splits["val"][0].file
    raw = bytearray(shard.read_bytes())
    at = 2 * (16 * 3 + 5)  # token 5 of sample 3 only (sample 2 ends at its token 0)
    raw[at: at + 2] = (tok.vocab_size + 5).to_bytes(2, "little")
    shard.write_bytes(bytes(raw))
    TokenShards(copy, "val", 16).check_ids(tok.vocab_size, max_samples=3)
    with pytest.raises(ShardCorruption, match="outside the vocabulary"):
        TokenShards(copy, "val", 16).check_ids(tok.vocab_size, max_samples=4)


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


def test_format_1_shards_load_and_convert_keeps_their_checksums(built, tmp_path):
    """Shards written before side files (every document id in the manifest) still load;
    ``data convert`` moves the ids into side files and leaves the shards as they were."""
    from fbi.data.cli import convert_command

    _, _, out, manifest = built
    old = tmp_path / "old"
    old.mkdir()
    for s in manifest.splits["train"] + manifest.splits["val"]:
        shutil.copy(out / s.file, old / s.file)
    ids = {"train": list(range(0, 40)), "val": [40, 41]}
    legacy = {k: v for k, v in json.loads((out / "manifest.json").read_text()).items()
              if k != "format"}
    (old / "manifest.json").write_text(json.dumps({**legacy, "documents": ids}))
    before = TokenShards(old, "train", 16)
    assert Manifest.load(old).format == 1
    assert Manifest.load(old).document_table(old, "val")[:, 0].tolist() == [40, 41]
    assert convert_command(type("A", (), {"shards_dir": old})())["converted"]
    after = Manifest.load(old)
    assert after.format == 2 and after.splits == manifest.splits
    assert after.document_table(old, "train")[:, 0].tolist() == ids["train"]
    np.testing.assert_array_equal(TokenShards(old, "train", 16).batch(range(5)),
                                  before.batch(range(5)))
    assert verify_checksums(old) == []


@pytest.mark.parametrize("text", ["{not json", '{"splits": 3}', "[]"])
def test_a_garbage_manifest_is_refused_naming_the_folder(tmp_path, text):
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(ConfigError, match="data.shards_dir: .*manifest.json is not a shard manifest"):
        Manifest.load(tmp_path)


def test_one_document_and_a_vocabulary_below_the_characters_are_refused(tmp_path, tokenizer_dir):
    from fbi.data.tokenizer import train_sentencepiece

    with pytest.raises(ConfigError, match="tokenizer.vocab_size: sentencepiece cannot train 40"):
        train_sentencepiece(wikitext_lines(20_000), 40, tmp_path / "sp" / "t.model")
    (tmp_path / "one.txt").write_text("\n".join(wikitext_lines(5_000)))
    cfg = DataConfig(name="t", corpus=None, files=[str(tmp_path / "one.txt")])
    with pytest.raises(ConfigError, match="data: 1 document"):
        ensure_shards(cfg, load_tokenizer(str(tokenizer_dir)), tmp_path / "cache")


@pytest.mark.multiprocess
def test_data_verify_splits_the_shards_over_torchrun_ranks(built, tmp_path):
    """`python -m fbi data verify` under torchrun: each rank hashes its share, all of them
    report every bad shard and exit 1; on intact shards, 0."""
    import os

    from fbi_testing import REPO, run_ranks

    _, _, out, manifest = built
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    argv = ["-m", "fbi", "data", "verify", str(copy)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    ok = run_ranks(argv, cwd=REPO, env=env, timeout=300)
    assert '"ok": true' in ok.stdout
    shard = copy / manifest.splits["train"][2].file
    raw = bytearray(shard.read_bytes())
    raw[7] ^= 0x01
    shard.write_bytes(bytes(raw))
    bad = run_ranks(argv, check=False, cwd=REPO, env=env, timeout=300)
    assert bad.returncode != 0
    assert bad.stdout.count(f"shard {shard} fails its sha256 checksum") == 2  # both ranks say it
