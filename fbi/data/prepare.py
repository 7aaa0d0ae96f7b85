"""Corpus -> token shards, as a job of independent workers that a cheap step merges.

The order rule, which makes the shards independent of how many workers wrote them: input
files are sorted by path and numbered; file ``j`` is tokenized by worker ``j mod workers``,
in row order, into its own shards ``d<j>_<k>.bin`` (documents kept for training) and
``d<j>_val_<k>.bin`` (documents held out), cut every ``data.shard_tokens`` tokens, with their
document boundaries in ``d<j>.docs`` and ``d<j>_val.docs``. A row goes to validation when a
hash of (``split_seed``, the file's name, its row) falls below ``val_fraction``, so the choice
is made where the row is read. A file that is one document (text, 1-D ``.npy``, flat ``.bin``)
is not split; when no row is held out (such files, or few rows), whole files are: the fewest
from the end of a ``split_seed`` order of the files reaching ``val_fraction`` of the tokens,
the rule train.py applied to documents before preparation ran as workers.

When a file is done, its record ``progress/d<j>.json`` is written (atomically, last): a killed
worker restarts at the first file without one and writes it again byte for byte. The worker
that finds every record present writes ``manifest.json`` (the train split: the files' kept
shards in file order; val: their held-out shards), reading only the records.

Run it as ``python -m fbi data prepare`` (see ``fbi.data.cli``), under torchrun or as a SLURM
array; train.py runs it in-process, one worker, when its shards are missing.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import time
from array import array
from pathlib import Path
from typing import Iterator

import numpy as np

from fbi.atomic import write_json
from fbi.config import ConfigError, DataConfig
from fbi.data.readers import check_utf8, kind_of, one_document, read_documents, yields_tokens
from fbi.data.sampler import mix64, splitmix64
from fbi.data.shards import DOCS_DTYPE, FORMAT, MANIFEST, Manifest, ShardInfo, ShardWriter, token_dtype
from fbi.data.tokenizer import Tokenizer
from fbi.progress import Progress

log = logging.getLogger(__name__)

PROGRESS = "progress"
DOC_COLUMNS = ["file", "row", "offset"]
BATCH_CHARS = 1 << 20  # texts handed to the tokenizer at once (about 1 MB)
CHUNK_TOKENS = 1 << 24  # ids made elsewhere are copied and checked this many at a time


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
    """The reader kind of ``files`` (all of one kind); refuses a mixture of kinds."""
    return kind_of(files)


def iter_texts(cfg: DataConfig, cache_dir: Path) -> Iterator[str]:
    """The corpus's documents as texts. Files are checked here, before the first text is
    taken: a consumer such as sentencepiece's trainer would hide our message inside its own."""
    files = corpus_files(cfg, cache_dir)
    kind = kind_of(files)
    if yields_tokens(cfg, kind):
        raise ConfigError("tokenizer.path: the corpus is token ids already, so no tokenizer "
                          "can be trained on it; name the tokenizer that made them")
    if kind == "text":
        for path in files:
            check_utf8(path)
    return (text for path in files for _, text in read_documents(cfg, path, kind))


def separator_ids(cfg: DataConfig, tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """Token ids written before and after every document (``data.separator``)."""
    if cfg.separator == "none":
        return [], []
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
            "bos_eos, none or one of its special tokens"
        )
    return [], [token]


def document_start_id(data: DataConfig, tokenizer: Tokenizer) -> int:
    """The token that precedes every document in training: the BOS of ``bos_eos``, else the
    separator written after the previous document; with ``none`` (ids that carry their own
    separators), the tokenizer's BOS, else its EOS."""
    before, after = separator_ids(data, tokenizer)
    fallback = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    return (before or after or [fallback])[-1]


def held_out(cfg: DataConfig, path: str, rows: np.ndarray) -> np.ndarray:
    """Which ``rows`` of file ``path`` go to validation: a hash of (split_seed, the file's
    name, row) below ``val_fraction``; the name, not the path, so a moved corpus splits alike."""
    name_key = hashlib.sha256(f"{cfg.split_seed}:{Path(path).name}".encode()).digest()[:8]
    u = mix64(rows.astype(np.uint64), splitmix64(int.from_bytes(name_key, "little")))
    return (u >> np.uint64(11)).astype(np.float64) * 2.0 ** -53 < cfg.val_fraction


def source_key(cfg: DataConfig, tokenizer: Tokenizer, cache_dir: Path) -> dict:
    """Everything that decides the tokens: each source file's path, size and mtime, the
    tokenizer, and the settings that shape the split. Its hash names the cache folder."""
    files = corpus_files(cfg, cache_dir)
    return {
        "format": FORMAT,
        "files": [[f, os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files],
        "text_field": cfg.text_field, "token_field": cfg.token_field,
        "token_dtype": cfg.token_dtype, "tokenizer": tokenizer.fingerprint,
        "separator": cfg.separator, "val_fraction": cfg.val_fraction,
        "split_seed": cfg.split_seed, "shard_tokens": cfg.shard_tokens,
    }


class FileTokenizer:
    """Turns one input file into its two shard streams, side files and record."""

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, out_dir: Path, kind: str) -> None:
        self.cfg, self.tokenizer, self.out_dir, self.kind = cfg, tokenizer, out_dir, kind
        self.before, self.after = (np.asarray(ids, dtype=np.int64)
                                   for ids in separator_ids(cfg, tokenizer))
        self.dtype = token_dtype(tokenizer.vocab_size)

    def run(self, number: int, path: str) -> dict:
        started = time.perf_counter()
        prefix = f"d{number:06d}"
        for stale in self.out_dir.glob(f"{prefix}[._]*"):  # a killed attempt's leftovers
            stale.unlink()
        writers = {s: ShardWriter(self.out_dir, prefix + tail, self.dtype, self.cfg.shard_tokens)
                   for s, tail in (("train", ""), ("val", "_val"))}
        docs = {"train": array("q"), "val": array("q")}  # 24 bytes a document, not objects
        whole = one_document(path, self.kind)
        for rows, arrays in self._batches(path):
            val = held_out(self.cfg, path, np.asarray(rows, dtype=np.int64)) & (not whole)
            for row, ids, is_val in zip(rows, arrays, val):
                split = "val" if is_val else "train"
                docs[split].extend((number, row, writers[split].written))
                self._write(writers[split], ids, path, row)
        record = {"input": [path, os.stat(path).st_size, os.stat(path).st_mtime_ns],
                  "seconds": time.perf_counter() - started}
        for split, tail in (("train", ""), ("val", "_val")):
            table = np.frombuffer(docs[split], dtype=np.int64).astype(DOCS_DTYPE).reshape(
                -1, len(DOC_COLUMNS))
            table.tofile(self.out_dir / f"{prefix}{tail}.docs")
            record[split] = {
                "shards": [vars(s) for s in writers[split].close()],
                "documents": {"file": f"{prefix}{tail}.docs", "columns": DOC_COLUMNS,
                              "count": len(table)},
            }
        write_json(self.out_dir / PROGRESS / f"{prefix}.json", record)
        return record

    def _batches(self, path: str) -> Iterator[tuple[list[int], list]]:
        """Rows of ``path`` with their documents as token ids (lists or arrays), in batches
        of about ``BATCH_CHARS`` characters or tokens."""
        rows, items, size = [], [], 0
        for row, doc in read_documents(self.cfg, path, self.kind):
            rows.append(row)
            items.append(doc)
            size += len(doc)
            if size >= BATCH_CHARS:
                yield rows, self._encode(items)
                rows, items, size = [], [], 0
        if rows:
            yield rows, self._encode(items)

    def _encode(self, items: list) -> list:
        return self.tokenizer.encode(items) if isinstance(items[0], str) else items

    def _write(self, writer: ShardWriter, ids, path: str, row: int) -> None:
        """One document with its separators; ids made elsewhere are checked against the
        vocabulary, a chunk at a time (a flat .bin may be one document of billions)."""
        writer.write(self.before)
        if isinstance(ids, list):
            writer.write(np.asarray(ids, dtype=np.int64))
        else:
            for start in range(0, len(ids), CHUNK_TOKENS):
                chunk = np.asarray(ids[start: start + CHUNK_TOKENS])
                check_vocabulary(chunk, self.tokenizer, path, row, start)
                writer.write(chunk)
        writer.write(self.after)


def check_vocabulary(ids: np.ndarray, tokenizer: Tokenizer, path: str, row: int,
                     offset: int = 0) -> None:
    """Refuse ids outside ``[0, vocab_size)``, naming the file, the document (row) and the
    position in it (``offset`` + index in ``ids``)."""
    bad = np.flatnonzero((ids < 0) | (ids >= tokenizer.vocab_size))
    if bad.size:
        at = int(bad[0]) + offset
        raise ConfigError(
            f"data.files: {path}, document {row}, position {at} holds token id {int(ids[at - offset])}, "
            f"outside the vocabulary of {tokenizer.vocab_size} of {tokenizer.source}; name the "
            "tokenizer the ids were made with (tokenizer.path=...)"
        )


def prepare(cfg: DataConfig, tokenizer: Tokenizer, out_dir: Path, cache_dir: Path,
            sources: dict, worker: int = 0, workers: int = 1) -> dict:
    """Worker ``worker`` of ``workers``: tokenize input files ``worker, worker + workers, ...``
    not yet recorded as done, then write the manifest if every file is done.

    Returns what this worker did: files, tokens, seconds, tokens_per_s, and ``manifest``
    (whether this worker wrote it).
    """
    if not 0 <= worker < workers:
        raise ConfigError(f"--worker: {worker} is not in [0, {workers}); number the workers "
                          "0 .. workers - 1")
    files = [f for f, _, _ in sources["files"]]
    kind = kind_of(files)
    (out_dir / PROGRESS).mkdir(parents=True, exist_ok=True)
    claim_settings(out_dir, sources)
    job = FileTokenizer(cfg, tokenizer, out_dir, kind)
    done = {"worker": worker, "workers": workers, "files": 0, "tokens": 0, "seconds": 0.0}
    pending = [n for n in range(worker, len(files), workers)
               if recorded(out_dir, number=n, source=sources["files"][n]) is None]
    progress = Progress(f"worker {worker}/{workers}", len(pending), "files",
                        enabled=worker == 0)  # the others log each file they finish
    for number in pending:
        record = job.run(number, files[number])
        progress.update()
        tokens = sum(s["tokens"] for split in ("train", "val") for s in record[split]["shards"])
        done["files"] += 1
        done["tokens"] += tokens
        done["seconds"] += record["seconds"]
        log.info("worker %d/%d: %s -> %d tokens in %.1f s (%.0f tokens/s)", worker, workers,
                 files[number], tokens, record["seconds"], tokens / max(record["seconds"], 1e-9))
    progress.close()
    done["tokens_per_s"] = done["tokens"] / done["seconds"] if done["seconds"] else None
    done["manifest"] = merge(cfg, tokenizer, out_dir, sources) is not None
    return done


def claim_settings(out_dir: Path, sources: dict) -> None:
    """Record the settings of the preparation in ``out_dir``; refuse a folder that holds
    one with other settings (its records would be mixed with ours)."""
    path = out_dir / PROGRESS / "settings.json"
    if path.exists():
        found = json.loads(path.read_text())
        if found != json.loads(json.dumps(sources)):
            raise ConfigError(
                f"data.shards_dir: {out_dir} holds a preparation with other sources or settings "
                f"({path}); name another data.shards_dir, or delete the folder to start over"
            )
    else:
        write_json(path, sources)


def recorded(out_dir: Path, number: int, source: list) -> dict | None:
    """The record of input file ``number`` if it is done and the file unchanged since."""
    path = out_dir / PROGRESS / f"d{number:06d}.json"
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    return record if record["input"] == list(source) else None


def merge(cfg: DataConfig, tokenizer: Tokenizer, out_dir: Path, sources: dict) -> Manifest | None:
    """Write the manifest from the records, if every input file has one; else None."""
    records = []
    for number, source in enumerate(sources["files"]):
        record = recorded(out_dir, number, source)
        if record is None:
            return None
        records.append(record)
    split_of = file_split(cfg, records) if not any(r["val"]["shards"] for r in records) else None
    splits: dict[str, list] = {"train": [], "val": []}
    documents: dict[str, list] = {"train": [], "val": []}
    for number, record in enumerate(records):
        for part in ("train", "val"):
            split = part if split_of is None else split_of[number]
            splits[split] += [ShardInfo(**s) for s in record[part]["shards"]]
            documents[split].append(record[part]["documents"])
    manifest = Manifest(
        tokenizer_fingerprint=tokenizer.fingerprint, tokenizer_source=tokenizer.source,
        vocab_size=tokenizer.vocab_size, dtype=token_dtype(tokenizer.vocab_size).name,
        splits=splits, sources=sources, documents=documents, format=FORMAT,
    )
    manifest.save(out_dir)
    n_docs = {s: sum(d["count"] for d in documents[s]) for s in documents}
    log.info("wrote the manifest of %s: %d train + %d val tokens (%d + %d documents)", out_dir,
             manifest.tokens("train"), manifest.tokens("val"), n_docs["train"], n_docs["val"])
    return manifest


def file_split(cfg: DataConfig, records: list[dict]) -> list[str]:
    """When no document drew validation: hold out whole files, the fewest from the end of a
    ``split_seed`` order of the files that reach ``val_fraction`` of the tokens."""
    tokens = np.array([sum(s["tokens"] for s in r["train"]["shards"]) for r in records])
    n_docs = sum(r["train"]["documents"]["count"] for r in records)
    if n_docs < 2:
        raise ConfigError(
            f"data: {n_docs} document(s) found; the split needs at least two (one for "
            "validation), so add text or split it into several files/rows"
        )
    if (tokens > 0).sum() < 2:
        raise ConfigError(
            f"data.val_fraction: none of the {n_docs} documents drew a place in validation "
            f"at {cfg.val_fraction}, and whole files cannot be held out from "
            f"{(tokens > 0).sum()} file(s) with tokens; raise data.val_fraction or add files"
        )
    order = np.random.default_rng(cfg.split_seed).permutation(len(records))
    from_end = np.cumsum(tokens[order][::-1])
    count = int(np.searchsorted(from_end, tokens.sum() * cfg.val_fraction)) + 1
    val = set(order[::-1][:count].tolist())
    if len(val) == len(records) or not tokens[sorted(set(range(len(records))) - val)].sum():
        raise ConfigError(
            f"data.val_fraction: {cfg.val_fraction} of {len(records)} files leaves nothing for "
            "training; lower it or add files"
        )
    return ["val" if i in val else "train" for i in range(len(records))]


def shards_dir(cfg: DataConfig, key: dict | None, cache_dir: Path) -> Path:
    if cfg.shards_dir:
        return Path(cfg.shards_dir).expanduser()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / "shards" / f"{cfg.name}-{digest}"


def ensure_shards(cfg: DataConfig, tokenizer: Tokenizer, cache_dir: Path) -> Path:
    """Prepare the shards (one worker, in this process) unless a manifest is there; refuse
    shards of another tokenizer. With ``data.mix``, check every entry and return the first
    (whose val split is the run's)."""
    if cfg.mix:
        dirs = [check_tokenizer(Path(m.shards_dir).expanduser(), tokenizer) for m in cfg.mix]
        return dirs[0]
    key = None if cfg.shards_dir else source_key(cfg, tokenizer, cache_dir)
    directory = shards_dir(cfg, key, cache_dir)
    if not (directory / MANIFEST).exists():
        if not (cfg.corpus or cfg.files):
            raise FileNotFoundError(
                f"data.shards_dir: {directory} has no {MANIFEST} and no data.corpus or "
                "data.files is given to build it from"
            )
        prepare(cfg, tokenizer, directory, cache_dir, key or source_key(cfg, tokenizer, cache_dir))
        if not (directory / MANIFEST).exists():
            raise RuntimeError(f"preparation of {directory} ended without a manifest")
    return check_tokenizer(directory, tokenizer)


def check_tokenizer(directory: Path, tokenizer: Tokenizer) -> Path:
    if not (directory / MANIFEST).exists():
        raise FileNotFoundError(f"data.mix: {directory} has no {MANIFEST}; prepare it first "
                                "(python -m fbi data prepare ... data.shards_dir=DIR)")
    manifest = Manifest.load(directory)
    if manifest.tokenizer_fingerprint != tokenizer.fingerprint:
        raise ConfigError(
            f"data.shards_dir: {directory} was tokenized with {manifest.tokenizer_source} "
            f"(fingerprint {manifest.tokenizer_fingerprint}) but the student uses "
            f"{tokenizer.source} ({tokenizer.fingerprint}); point data.shards_dir elsewhere "
            "or delete it to re-tokenize"
        )
    return directory
