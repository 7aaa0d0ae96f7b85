"""Corpus -> token shards. Text, jsonl and parquet files are read through ``datasets``."""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from fbi.config import ConfigError, DataConfig
from fbi.atomic import staging_dir
from fbi.data.shards import MANIFEST, Manifest, ShardWriter, token_dtype
from fbi.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def corpus_files(cfg: DataConfig, cache_dir: Path) -> list[str]:
    if cfg.files:
        files = sorted({f for pattern in cfg.files for f in glob.glob(str(Path(pattern).expanduser()))})
        if not files:
            raise ConfigError(f"data.files: no file matches {list(cfg.files)}; name existing "
                              "files or glob patterns")
        return files
    from fbi.data.sources import obtain_corpus

    return [str(p) for p in obtain_corpus(cfg.corpus, cache_dir)]


def builder_for(files: list[str]) -> str:
    """The ``datasets`` builder that reads ``files`` (all of one kind)."""
    kinds = {Path(f).suffix.lower() for f in files}
    unknown = kinds - BUILDERS.keys()
    if unknown or len({BUILDERS[k] for k in kinds}) != 1:
        raise ConfigError(
            f"data.files: got extensions {sorted(kinds)}; use files of one kind among "
            f"{sorted(BUILDERS)}"
        )
    return BUILDERS[kinds.pop()]


def load_documents(cfg: DataConfig, files: list[str], cache_dir: Path):
    """A ``datasets.Dataset`` with one document per row in column ``text``."""
    import datasets

    builder = builder_for(files)
    extra = {"sample_by": "document"} if builder == "text" else {}
    if builder == "text":
        for f in files:
            check_utf8(f)
    try:
        ds = datasets.load_dataset(
            builder, data_files=files, split="train", cache_dir=str(cache_dir / "datasets"), **extra
        )
    except Exception as err:  # datasets' parse errors: name the setting and the files
        raise ConfigError(
            f"data.files: {builder} files {files[:3]}{' ...' if len(files) > 3 else ''} could "
            f"not be read ({type(err).__name__}: {str(err).splitlines()[0][:300]}); fix or "
            "remove the file"
        ) from err
    if cfg.text_field not in ds.column_names:
        raise ConfigError(
            f"data.text_field: {cfg.text_field!r} is not a column of {files[0]}; "
            f"columns are {ds.column_names}"
        )
    if cfg.text_field != "text":
        ds = ds.rename_column(cfg.text_field, "text")
    return ds.select_columns(["text"])


def check_utf8(path: str, chunk: int = 1 << 20) -> None:
    """Refuse a text file that is not UTF-8 text (a binary file named .txt), naming the byte."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            bad = None
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as err:
                bad = (err.start, err.reason)
            nul = block.find(b"\0")
            if nul >= 0 and (bad is None or nul < bad[0]):
                bad = (nul, "a NUL byte")
            if bad:
                raise ConfigError(
                    f"data.files: {path} is not UTF-8 text (byte {offset + bad[0]}: {bad[1]}); "
                    "convert it (iconv -t UTF-8) or remove it from data.files"
                )
            if not block:
                return
            offset += len(block)


def iter_texts(cfg: DataConfig, cache_dir: Path) -> Iterator[str]:
    for row in load_documents(cfg, corpus_files(cfg, cache_dir), cache_dir):
        yield row["text"]


def separator_ids(cfg: DataConfig, tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """Token ids written before and after every document (``data.separator``)."""
    if cfg.separator == "eos":
        return [], [tokenizer.eos_id]
    if cfg.separator == "bos_eos":
        if tokenizer.bos_id is None:
            raise ConfigError(
                f"data.separator: bos_eos, but the tokenizer {tokenizer.source} has no BOS "
                "token; use data.separator=eos"
            )
        return [tokenizer.bos_id], [tokenizer.eos_id]
    token = tokenizer.token_id(cfg.separator)
    if token is None:
        raise ConfigError(
            f"data.separator: {cfg.separator!r} is not a token of {tokenizer.source}; use eos, "
            "bos_eos or one of its special tokens"
        )
    return [], [token]


def document_start_id(data: DataConfig, tokenizer: Tokenizer) -> int:
    """The token that precedes every document in training: the BOS of ``bos_eos``, else the
    separator written after the previous document."""
    before, after = separator_ids(data, tokenizer)
    return (before or after)[-1]


def build_shards(
    cfg: DataConfig, tokenizer: Tokenizer, out_dir: Path, cache_dir: Path, sources: dict
) -> Manifest:
    """Tokenize every document with its separators, shuffle document order, and hold out
    whole documents from the end of that order until ``val_fraction`` of the tokens is
    reached, so that no document is split between training and validation."""
    docs = load_documents(cfg, corpus_files(cfg, cache_dir), cache_dir)
    docs = docs.add_column("doc", list(range(len(docs))))
    docs = docs.shuffle(seed=cfg.split_seed).flatten_indices()
    before, after = separator_ids(cfg, tokenizer)

    def encode(batch: dict) -> dict:
        ids = [before + doc + after for doc in tokenizer.encode(batch["text"])]
        return {"ids": ids, "n": [len(doc) for doc in ids]}

    tokenized = docs.map(encode, batched=True, remove_columns=["text"], desc="tokenizing")
    lengths = np.asarray(tokenized["n"], dtype=np.int64)
    if len(lengths) < 2:
        raise ConfigError(
            f"data: {len(lengths)} document(s) found; the split needs at least two (one for "
            "validation), so add text or split it into several files/rows"
        )
    # Validation: the fewest whole documents from the end that reach val_fraction.
    from_end = np.cumsum(lengths[::-1])
    n_val_docs = min(len(lengths) - 1, int(np.searchsorted(from_end, lengths.sum() * cfg.val_fraction)) + 1)
    first_val = len(lengths) - n_val_docs
    dtype = token_dtype(tokenizer.vocab_size)
    with staging_dir(out_dir) as tmp:  # the manifest is written last, the folder renamed
        writers = {s: ShardWriter(tmp, s, dtype, cfg.shard_tokens) for s in ("train", "val")}
        for start in range(0, len(lengths), 1024):
            batch = tokenized[start : start + 1024]
            for i, ids in enumerate(batch["ids"], start):
                writers["train" if i < first_val else "val"].write(np.asarray(ids, np.int64))
        manifest = Manifest(
            tokenizer_fingerprint=tokenizer.fingerprint, tokenizer_source=tokenizer.source,
            vocab_size=tokenizer.vocab_size, dtype=dtype.name,
            splits={s: w.close() for s, w in writers.items()},
            sources=sources,
            documents={"train": tokenized["doc"][:first_val], "val": tokenized["doc"][first_val:]},
        )
        manifest.save(tmp)
    log.info("wrote %d train + %d val tokens (%d + %d documents) to %s",
             lengths[:first_val].sum(), lengths[first_val:].sum(), first_val, n_val_docs, out_dir)
    return manifest


def source_key(cfg: DataConfig, tokenizer: Tokenizer, cache_dir: Path) -> dict:
    """Everything that decides the tokens: each source file's path, size and mtime, the
    tokenizer, and the settings that shape the split. Its hash names the cache folder."""
    files = corpus_files(cfg, cache_dir)
    return {
        "files": [[f, os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files],
        "text_field": cfg.text_field, "tokenizer": tokenizer.fingerprint,
        "separator": cfg.separator, "val_fraction": cfg.val_fraction,
        "split_seed": cfg.split_seed, "shard_tokens": cfg.shard_tokens,
    }


def shards_dir(cfg: DataConfig, key: dict | None, cache_dir: Path) -> Path:
    if cfg.shards_dir:
        return Path(cfg.shards_dir).expanduser()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / "shards" / f"{cfg.name}-{digest}"


def ensure_shards(cfg: DataConfig, tokenizer: Tokenizer, cache_dir: Path) -> Path:
    """Build the shards unless a manifest is there; refuse shards of another tokenizer."""
    key = None if cfg.shards_dir else source_key(cfg, tokenizer, cache_dir)
    directory = shards_dir(cfg, key, cache_dir)
    if not (directory / MANIFEST).exists():
        if not (cfg.corpus or cfg.files):
            raise FileNotFoundError(
                f"data.shards_dir: {directory} has no {MANIFEST} and no data.corpus or "
                "data.files is given to build it from"
            )
        build_shards(cfg, tokenizer, directory, cache_dir,
                     key or source_key(cfg, tokenizer, cache_dir))
    manifest = Manifest.load(directory)
    if manifest.tokenizer_fingerprint != tokenizer.fingerprint:
        raise ConfigError(
            f"data.shards_dir: {directory} was tokenized with {manifest.tokenizer_source} "
            f"(fingerprint {manifest.tokenizer_fingerprint}) but the student uses "
            f"{tokenizer.source} ({tokenizer.fingerprint}); point data.shards_dir elsewhere "
            "or delete it to re-tokenize"
        )
    return directory
