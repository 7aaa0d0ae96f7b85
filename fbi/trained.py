"""A trained model from wherever it lives: a run directory, a packed export, or a Hugging Face
checkpoint (a teacher, or an fbi model exported with ``--format hf``).

Evaluation, generation and the lm-eval adapter all take a ``fbi.lm.Trained``: a function from
token ids to logits, the tokenizer, the token that precedes a document, and the context length.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from fbi.configure import validate
from fbi.consolidate import consolidate
from fbi.data.prepare import document_start_id, ensure_shards
from fbi.data.shards import TokenShards
from fbi.data.tokenizer import Tokenizer, load_tokenizer
from fbi.export.packed import PACKED_CONFIG, load_packed
from fbi.lm import Trained
from fbi.models import build_model


def run_tokenizer(run_dir: Path) -> Tokenizer:
    """The tokenizer a run trained with (``tokenizer.json`` names its source)."""
    info = json.loads((run_dir / "tokenizer.json").read_text())
    source = Path(info["source"])
    if not source.exists() and (run_dir / source.name).exists():
        source = run_dir / source.name  # a run directory moved with its tokenizer.model
    tokenizer = load_tokenizer(str(source))
    if tokenizer.fingerprint != info["fingerprint"]:
        raise ValueError(
            f"{run_dir}/tokenizer.json: the tokenizer at {source} is not the one this run "
            f"trained with (fingerprint {tokenizer.fingerprint}, run {info['fingerprint']}); "
            "restore the original tokenizer at that path"
        )
    return tokenizer


def run_config(run_dir: Path):
    """The run's resolved ``TrainConfig`` (``config.yaml``), its model of any architecture."""
    return validate(OmegaConf.load(run_dir / "config.yaml"))


def load_run(run_dir: Path, tag: str | None = None) -> Trained:
    """The newest (or ``tag``) checkpoint of a run, of any ZeRO stage and world size."""
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    model = build_model(cfg.model, cfg.scheme)
    model.load_state_dict(consolidate(run_dir, tag), strict=True)
    tokenizer = run_tokenizer(run_dir)
    return Trained(model.eval(), model, tokenizer, document_start_id(cfg.data, tokenizer),
                   cfg.data.seq_len, str(run_dir), cfg.model, cfg.scheme)


def load_hf(directory: Path) -> Trained:
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(str(directory))
    start = getattr(model.config, "document_start_token_id", None)  # an fbi export's
    if start is None:  # any other checkpoint: lm-eval's rule
        start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    return Trained(model, lambda ids: model(ids).logits, tokenizer, start,
                   model.config.max_position_embeddings, str(directory))


def load(path: str | Path, tag: str | None = None) -> Trained:
    """A run directory, a packed export (``fbi_packed.json``) or a Hugging Face checkpoint."""
    path = Path(path).expanduser()
    if (path / PACKED_CONFIG).exists():
        return load_packed(path)
    if (path / "config.yaml").exists() and (path / "checkpoints").exists():
        return load_run(path, tag)
    if (path / "config.json").exists():
        return load_hf(path)
    raise FileNotFoundError(
        f"{path}: neither a run directory (config.yaml + checkpoints/), a packed export "
        f"({PACKED_CONFIG}) nor a Hugging Face checkpoint (config.json)"
    )


def run_val_split(run_dir: Path):
    """(the run's held-out token shards, its TrainConfig): the split and batch settings its
    in-training evaluation used, so that a perplexity measured later is the same number."""
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    shards = ensure_shards(cfg.data, run_tokenizer(run_dir), Path(cfg.cache_dir).expanduser())
    return TokenShards(shards, "val", cfg.data.seq_len, cfg.data.verify_checksums), cfg
