"""Corpus -> token shards. Text, jsonl and parquet files are read through ``datasets``."""

from __future__ import annotations

import glob
import logging
from pathlib import Path
from typing import Iterator

import numpy as np

from fbi.config import DataConfig
from fbi.atomic import staging_dir
from fbi.data.shards import MANIFEST, Manifest, ShardWriter, token_dtype
from fbi.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def corpus_files(cfg: DataConfig, cache_dir: Path) -> list[str]:
    if cfg.files:
        files = sorted({f for pattern in cfg.files for f in glob.glob(str(Path(pattern).expanduser()))})
        if not files:
            raise FileNotFoundError(f"data.files: no file matches {list(cfg.files)}")
        return files
    from fbi.data.sources import obtain_corpus

    return [str(p) for p in obtain_corpus(cfg.corpus, cache_dir)]


def load_documents(cfg: DataConfig, files: list[str], cache_dir: Path):
    """A ``datasets.Dataset`` with one document per row in column ``text``."""
    import datasets

    kinds = {Path(f).suffix.lower() for f in files}
    unknown = kinds - BUILDERS.keys()
    if unknown or len({BUILDERS[k] for k in kinds}) != 1:
        raise ValueError(
            f"data.files: got extensions {sorted(kinds)}; use files of one kind among "
            f"{sorted(BUILDERS)}"
        )
    builder = BUILDERS[kinds.pop()]
    extra = {"sample_by": "document"} if builder == "text" else {}
    ds = datasets.load_dataset(
        builder, data_files=files, split="train", cache_dir=str(cache_dir / "datasets"), **extra
    )
    if cfg.text_field not in ds.column_names:
        raise ValueError(
            f"data.text_field: {cfg.text_field!r} is not a column of {files[0]}; "
            f"columns are {ds.column_names}"
        )
    if cfg.text_field != "text":
        ds = ds.rename_column(cfg.text_field, "text")
    return ds.select_columns(["text"])


def iter_texts(cfg: DataConfig, cache_dir: Path) -> Iterator[str]:
    for row in load_documents(cfg, corpus_files(cfg, cache_dir), cache_dir):
        yield row["text"]


def build_shards(
    cfg: DataConfig, tokenizer: Tokenizer, out_dir: Path, cache_dir: Path
) -> Manifest:
    """Tokenize every document, append EOS, shuffle document order, split off validation.

    The last ``val_fraction`` of the shuffled token stream becomes the validation split.
    """
    docs = load_documents(cfg, corpus_files(cfg, cache_dir), cache_dir)
    docs = docs.shuffle(seed=cfg.split_seed).flatten_indices()
    eos = tokenizer.eos_id
    def encode(batch: dict) -> dict:
        ids = [doc + [eos] for doc in tokenizer.encode(batch["text"])]
        return {"ids": ids, "n": [len(doc) for doc in ids]}

    tokenized = docs.map(encode, batched=True, remove_columns=["text"], desc="tokenizing")
    total = int(np.sum(tokenized["n"]))
    n_val = max(1, int(total * cfg.val_fraction))
    dtype = token_dtype(tokenizer.vocab_size)
    with staging_dir(out_dir) as tmp:  # the manifest is written last, the folder renamed
        writers = {s: ShardWriter(tmp, s, dtype, cfg.shard_tokens) for s in ("train", "val")}
        written = 0
        for batch in tokenized.iter(batch_size=1024):
            arr = np.concatenate([np.asarray(ids, dtype=np.int64) for ids in batch["ids"]])
            cut = max(0, min(len(arr), total - n_val - written))
            writers["train"].write(arr[:cut])
            writers["val"].write(arr[cut:])
            written += len(arr)
        manifest = Manifest(
            tokenizer_fingerprint=tokenizer.fingerprint, tokenizer_source=tokenizer.source,
            vocab_size=tokenizer.vocab_size, dtype=dtype.name,
            splits={s: w.close() for s, w in writers.items()},
        )
        manifest.save(tmp)
    log.info("wrote %d train + %d val tokens to %s", total - n_val, n_val, out_dir)
    return manifest


def shards_dir(cfg: DataConfig, tokenizer: Tokenizer, cache_dir: Path) -> Path:
    if cfg.shards_dir:
        return Path(cfg.shards_dir).expanduser()
    name = f"{cfg.name}-{tokenizer.fingerprint}-val{cfg.val_fraction}-split{cfg.split_seed}"
    return cache_dir / "shards" / name


def ensure_shards(cfg: DataConfig, tokenizer: Tokenizer, cache_dir: Path) -> Path:
    """Build the shards unless a manifest is there; refuse shards of another tokenizer."""
    directory = shards_dir(cfg, tokenizer, cache_dir)
    if not (directory / MANIFEST).exists():
        if not (cfg.corpus or cfg.files):
            raise FileNotFoundError(
                f"data.shards_dir: {directory} has no {MANIFEST} and no data.corpus or "
                "data.files is given to build it from"
            )
        build_shards(cfg, tokenizer, directory, cache_dir)
    manifest = Manifest.load(directory)
    if manifest.tokenizer_fingerprint != tokenizer.fingerprint:
        raise ValueError(
            f"data.shards_dir: {directory} was tokenized with {manifest.tokenizer_source} "
            f"(fingerprint {manifest.tokenizer_fingerprint}) but the student uses "
            f"{tokenizer.source} ({tokenizer.fingerprint}); point data.shards_dir elsewhere "
            "or delete it to re-tokenize"
        )
    return directory
