"""``python -m fbi data prepare|verify|convert``: token shards as jobs of their own.

    # N workers: torchrun ranks, or SLURM array tasks (launch/slurm/prepare_data.sbatch)
    python -m fbi data prepare data=files 'data.files=[/corpus/*.jsonl]' tokenizer.path=TOK
    torchrun --nproc_per_node 8 -m fbi data prepare data=files ... tokenizer.path=TOK
    python -m fbi data prepare --worker 3 --workers 32 data=files ... tokenizer.path=TOK
    # hash every shard against the manifest (split over the ranks under torchrun)
    torchrun --nproc_per_node 8 -m fbi data verify /shards/amber
    # move a format-1 manifest's document ids into binary side files
    python -m fbi data convert /shards/old

``prepare`` takes train.py's overrides and writes where train.py will look (``data.shards_dir``,
or the folder under ``cache_dir`` keyed by the sources), so a run started after it finds the
shards ready. Each worker prints its files, tokens and tokens/s as JSON; the last to finish
writes the manifest. Restarting a killed worker skips its finished files.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch.distributed as dist

from fbi.config import ConfigError, DistributedConfig, TrainConfig
from fbi.data.prepare import prepare, shards_dir, source_key
from fbi.data.shards import DOCS_DTYPE, FORMAT, Manifest, verify_checksums
from fbi.data.tokenizer import load_tokenizer
from fbi.distributed import detect, init_distributed

log = logging.getLogger(__name__)


def prepare_command(args, overrides: list[str], compose: Callable[[list[str]], TrainConfig],
                    teacher_path: Callable[[TrainConfig], object]) -> dict:
    cfg = compose(overrides)
    if not (cfg.data.corpus or cfg.data.files):
        raise ConfigError("data: name what to prepare: data.corpus=... or data=files "
                          "data.files=[...]")
    source = cfg.tokenizer.path or teacher_path(cfg)
    if source is None:
        raise ConfigError("tokenizer.path: with teacher=none, name the tokenizer to tokenize "
                          "with (or the one that made the token ids)")
    env = detect(os.environ)
    worker = env.rank if args.worker is None else args.worker
    workers = env.world_size if args.workers is None else args.workers
    # One worker per core: the tokenizer's own threads would compete with the other workers.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tokenizer = load_tokenizer(str(source))
    cache = Path(cfg.cache_dir).expanduser().resolve()
    key = source_key(cfg.data, tokenizer, cache)
    out = shards_dir(cfg.data, key, cache)
    return {"shards_dir": str(out),
            **prepare(cfg.data, tokenizer, out, cache, key, worker, workers)}


def verify_command(args) -> dict:
    env = detect(os.environ)
    if env.world_size > 1:
        init_distributed(DistributedConfig(device="cpu"))
        bad = verify_checksums(args.shards_dir, env.rank, env.world_size)
        everyone: list = [None] * env.world_size
        dist.all_gather_object(everyone, bad)
        dist.destroy_process_group()
        bad = [message for rank_bad in everyone for message in rank_bad]
    else:
        bad = verify_checksums(args.shards_dir)
    manifest = Manifest.load(args.shards_dir)
    shards = sum(len(s) for s in manifest.splits.values())
    for message in bad:
        log.error("%s", message)
    if not bad:
        log.info("%s: all %d shards match their checksums", args.shards_dir, shards)
    return {"shards_dir": str(args.shards_dir), "shards": shards, "bad": bad, "ok": not bad}


def convert_command(args) -> dict:
    """Format 1 -> 2: the manifest's document id lists go to ``<split>.docs`` side files.
    The shards are not touched, so their checksums (and a logit cache made on them) hold."""
    directory = args.shards_dir
    manifest = Manifest.load(directory)
    if manifest.format >= FORMAT:
        return {"shards_dir": str(directory), "converted": False, "format": manifest.format}
    documents = {}
    for split, ids in manifest.documents.items():
        np.asarray(ids, dtype=DOCS_DTYPE).tofile(directory / f"{split}.docs")
        documents[split] = [{"file": f"{split}.docs", "columns": ["document"], "count": len(ids)}]
    manifest.documents, manifest.format = documents, FORMAT
    manifest.save(directory)
    return {"shards_dir": str(directory), "converted": True, "format": FORMAT}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fbi data", description=__doc__.split("\n")[0])
    verbs = p.add_subparsers(dest="verb", required=True)
    prep = verbs.add_parser("prepare", help="tokenize a corpus into shards (N workers)")
    prep.add_argument("--worker", type=int, default=None,
                      help="this worker's number (default: the torchrun/SLURM rank, else 0)")
    prep.add_argument("--workers", type=int, default=None,
                      help="how many workers share the files (default: the world size, else 1)")
    for name, text in (("verify", "hash every shard against the manifest"),
                       ("convert", "format-1 shards: document ids into side files")):
        sub = verbs.add_parser(name, help=text)
        sub.add_argument("shards_dir", type=Path, help="a folder with manifest.json")
    return p


def main(argv: list[str], compose: Callable[[list[str]], TrainConfig],
         teacher_path: Callable[[TrainConfig], object]) -> dict:
    """Run a data verb and return its result (``ok`` False: verification failed). The caller
    (the entry, above the registries) hands ``compose`` (overrides -> TrainConfig) and
    ``teacher_path`` (the teacher checkpoint whose tokenizer ``prepare`` uses when
    ``tokenizer.path`` is unset)."""
    args, overrides = parser().parse_known_args(argv)
    if args.verb != "prepare" and overrides:
        raise ConfigError(f"data {args.verb}: unexpected arguments {overrides}; it takes only "
                          "the shards folder")
    bad_override = [o for o in overrides if o.startswith("-")]
    if bad_override:
        raise ConfigError(f"data prepare: unknown option(s) {bad_override}; its options are "
                          "--worker and --workers, the rest are train.py's overrides")
    if args.verb == "prepare":
        return prepare_command(args, overrides, compose, teacher_path)
    return verify_command(args) if args.verb == "verify" else convert_command(args)
