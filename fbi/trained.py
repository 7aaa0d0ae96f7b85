"""A trained model from wherever it lives: a run directory, a packed export, or a Hugging Face
checkpoint (a teacher, or an fbi model exported with ``--format hf``).

Evaluation, generation and the lm-eval adapter all take a ``fbi.lm.Trained``: a function from
token ids to logits, the tokenizer, the token that precedes a document, and the context length.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from fbi.checkpoint import complete_tags, read_meta
from fbi.config import ConfigError
from fbi.configure import validate
from fbi.consolidate import consolidate
from fbi.data.prepare import document_start_id, ensure_shards
from fbi.data.shards import TokenShards
from fbi.data.tokenizer import Tokenizer, load_tokenizer
from fbi.export.packed import PACKED_CONFIG, WEIGHTS, load_packed, read_config
from fbi.lm import Trained
from fbi.models import build_model


def run_tokenizer(run_dir: Path) -> Tokenizer:
    """The tokenizer a run trained with (``tokenizer.json`` names its source)."""
    info = tokenizer_record(run_dir)
    source = Path(info["source"])
    if not source.exists() and (run_dir / source.name).exists():
        source = run_dir / source.name  # a run directory moved with its tokenizer.model
    tokenizer = load_tokenizer(str(source))
    if tokenizer.fingerprint != info["fingerprint"]:
        raise ConfigError(
            f"{run_dir}/tokenizer.json: the tokenizer at {source} is not the one this run "
            f"trained with (fingerprint {tokenizer.fingerprint}, run {info['fingerprint']}); "
            "restore the original tokenizer at that path"
        )
    return tokenizer


def tokenizer_record(run_dir: Path) -> dict:
    info = read_config(run_dir / "tokenizer.json")
    if not {"source", "fingerprint"} <= info.keys():
        raise ConfigError(f"MODEL: {run_dir / 'tokenizer.json'} is not the run's tokenizer record "
                         "(no source and fingerprint): something overwrote it; restore it from "
                         "a copy of the run")
    return info


def run_config(run_dir: Path):
    """The run's resolved ``TrainConfig`` (``config.yaml``), its model of any architecture."""
    return validate(OmegaConf.load(run_dir / "config.yaml"))


def read_rows(path: Path) -> list[dict]:
    """The rows of a jsonl log (``metrics.jsonl``); none when it does not exist."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line cut off by a kill
            continue
    return out


def run_provenance(run_dir: Path, cfg, tag: str) -> dict:
    """What a model card tells about checkpoint ``tag``: its step, the tokens trained on
    (samples consumed x seq_len predicted tokens), the teacher, and the run's last
    evaluations up to that step (``metrics.jsonl``)."""
    meta = read_meta(run_dir, tag)
    evaluation = {}
    for row in read_rows(run_dir / "metrics.jsonl"):
        if row.get("step", 0) <= meta["step"]:
            evaluation.update({k: v for k, v in row.items() if k.startswith(("val_ppl", "blimp"))})
    return {"run": str(run_dir.resolve()), "step": meta["step"],
            "tokens": meta["consumed"] * cfg.data.seq_len, "teacher": cfg.teacher.kind,
            "teacher_path": cfg.teacher.path, "data": cfg.data.name, "evaluation": evaluation}


def load_run(run_dir: Path, tag: str | None = None) -> Trained:
    """The newest (or ``tag``) checkpoint of a run, of any ZeRO stage and world size."""
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    tag = tag or complete_tags(run_dir)[-1]
    model = build_model(cfg.model, cfg.scheme)
    try:
        state = consolidate(run_dir, tag)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as err:  # torch's archive reader
        raise ConfigError(f"MODEL: checkpoint {tag} of {run_dir} cannot be read "
                         f"({' '.join(str(err).split())}); it is damaged: export another with "
                         f"--tag (complete ones: {', '.join(complete_tags(run_dir))})") from None
    model.load_state_dict(state, strict=True)
    tokenizer = run_tokenizer(run_dir)
    return Trained(model.eval(), model, tokenizer, document_start_id(cfg.data, tokenizer),
                   cfg.data.seq_len, str(run_dir), cfg.model, cfg.scheme,
                   run_provenance(run_dir, cfg, tag))


def load_hf(directory: Path) -> Trained:
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(str(directory))
    start = getattr(model.config, "document_start_token_id", None)  # an fbi export's
    if start is None:  # any other checkpoint: lm-eval's rule
        start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    return Trained(model, lambda ids: model(ids).logits, tokenizer, start,
                   model.config.max_position_embeddings, str(directory))


HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
              "pytorch_model.bin.index.json")


@dataclass
class Found:
    """What ``load`` would load from a path, known from its small files alone."""

    kind: str  # "run", "packed" or "hf"
    scheme: str | None  # fbi models: the scheme's name
    max_length: int | None  # the trained context (HF: max_position_embeddings, if any)


def find(path: str | Path, tag: str | None = None) -> Found:
    """Classify ``path`` reading only its config files, and refuse (ValueError, naming the
    argument and the fix) what ``load`` could not load: the check before anything large."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ConfigError(f"MODEL: {path} is not a folder; give a run directory, a packed export "
                         "or a Hugging Face checkpoint folder")
    if tag is not None and not (path / "config.yaml").exists():
        raise ConfigError(f"--tag: {path} is not a run directory, it has no checkpoints to "
                         "choose from; leave --tag out")
    if (path / PACKED_CONFIG).exists() and (path / "config.yaml").exists():
        raise ConfigError(f"MODEL: {path} holds both a run (config.yaml) and a packed export "
                         f"({PACKED_CONFIG}), written into it by an older fbi export; move the "
                         f"export's files ({PACKED_CONFIG}, model.safetensors, README.md) out")
    if (path / PACKED_CONFIG).exists():
        config = read_config(path / PACKED_CONFIG)
        if not (path / WEIGHTS).is_file():
            raise ConfigError(f"MODEL: the packed export {path} has no {WEIGHTS}; copy the whole "
                             "export folder, or export the run again")
        try:
            return Found("packed", config["scheme"]["name"], config["max_length"])
        except (KeyError, TypeError) as err:
            raise ConfigError(f"MODEL: {path / PACKED_CONFIG} lacks {err}; it is damaged or not "
                             "fbi's: export the run again") from None
    if (path / "config.yaml").exists():
        tags = complete_tags(path)
        if not tags:
            raise ConfigError(f"MODEL: the run directory {path} has no complete checkpoint "
                             "(checkpoints/step_*/complete.json); wait for its first save, or "
                             "train with a save_every it reaches")
        if tag is not None and tag not in tags:
            raise ConfigError(f"--tag: {path} has no complete checkpoint {tag!r}; choose one "
                             f"of {', '.join(tags)}, or leave --tag out for the newest")
        tokenizer_record(path)
        cfg = OmegaConf.load(path / "config.yaml")
        return Found("run", cfg.scheme.name, cfg.data.seq_len)
    if (path / "config.json").exists():
        config = read_config(path / "config.json")
        if not any((path / name).is_file() for name in HF_WEIGHTS):
            raise ConfigError(f"MODEL: the Hugging Face checkpoint {path} has no weights (none of "
                             f"{', '.join(HF_WEIGHTS)}); copy the whole folder, or export again")
        return Found("hf", None, config.get("max_position_embeddings"))
    raise ConfigError(
        f"MODEL: {path} is neither a run directory (config.yaml + checkpoints/), a packed "
        f"export ({PACKED_CONFIG}) nor a Hugging Face checkpoint (config.json); give one of those"
    )


def load(path: str | Path, tag: str | None = None, kernel: str | None = None) -> Trained:
    """A run directory, a packed export (``fbi_packed.json``) or a Hugging Face checkpoint.
    ``kernel``: how a packed export runs, ``packed`` (the default: ``fbi.kernels``) or
    ``dense``; other models are dense, and ``kernel="packed"`` for them is refused."""
    found = find(path, tag)
    if kernel == "packed" and found.kind != "packed":
        raise ValueError(
            f"--kernel packed: {path} is a {found.kind} model, not a packed export; the packed "
            "kernels run packed exports (python -m fbi export MODEL --format packed --out DIR), "
            "or leave --kernel out")
    loader = {"packed": lambda p: load_packed(p, kernel or "packed"),
              "run": lambda p: load_run(p, tag), "hf": load_hf}
    return loader[found.kind](Path(path).expanduser())


def run_val_split(run_dir: Path):
    """(the run's held-out token shards, its TrainConfig): the split and batch settings its
    in-training evaluation used, so that a perplexity measured later is the same number."""
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    shards = ensure_shards(cfg.data, run_tokenizer(run_dir), Path(cfg.cache_dir).expanduser())
    return TokenShards(shards, "val", cfg.data.seq_len, cfg.data.verify_checksums), cfg
