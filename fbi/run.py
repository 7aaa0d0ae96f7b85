"""Everything before the first step: run directory, teacher, tokenizer, shards, engine.

Cheap checks come first (tokenizer agreement, batch arithmetic, resume target) so that a
wrong setting fails in seconds, before the shards are built or the model is allocated.
Work that writes shared files (teacher conversion, tokenization) happens on rank 0 while
the other ranks wait at a barrier.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from fbi import checkpoint
from fbi.config import ConfigError, TrainConfig
from fbi.data.prepare import ensure_shards, iter_texts
from fbi.data.shards import TokenShards
from fbi.data.tokenizer import Tokenizer, load_tokenizer, train_sentencepiece
from fbi.deepspeed_setup import Dist, build_context, deepspeed_config, initialize
from fbi.distill.teacher import TeacherSource, build_teacher, resolve_path
from fbi.models import build_model

log = logging.getLogger("fbi")


@dataclass
class Run:
    cfg: TrainConfig
    dist: Dist
    run_dir: Path
    device: torch.device
    tokenizer: Tokenizer
    train_data: TokenShards
    val_data: TokenShards
    engine: object  # deepspeed.DeepSpeedEngine
    teacher: TeacherSource  # online, cache or none: the loop asks it for targets
    grad_accum: int
    resume_tag: str | None
    resume_universal: bool  # resume through DeepSpeed's universal format (world size changed)


def on_rank0_first(dist_info: Dist, fn, *args):
    """Run ``fn`` on rank 0, then on the others once rank 0 is done (they find its output)."""
    if dist_info.is_main:
        result = fn(*args)
        dist.barrier()
        return result
    dist.barrier()
    return fn(*args)


def resume_target(cfg: TrainConfig, run_dir: Path) -> str | None:
    tags = checkpoint.complete_tags(run_dir)
    if cfg.resume == "false" and tags:
        raise ConfigError(
            f"resume: {run_dir} already holds checkpoints ({tags[-1]}); pass resume=auto to "
            "continue that run, or choose another run_dir"
        )
    if cfg.resume == "true" and not tags:
        raise FileNotFoundError(
            f"resume: resume=true but {checkpoint.checkpoints_dir(run_dir)} has no complete "
            "checkpoint; check run_dir, or pass resume=auto to start fresh"
        )
    if tags and cfg.resume != "false":
        check_same_student(cfg, run_dir)
        return tags[-1]
    return None


def check_same_student(cfg: TrainConfig, run_dir: Path) -> None:
    """Refuse to resume checkpoints of another model or scheme (before anything is written)."""
    saved_file = run_dir / "config.yaml"
    if not saved_file.exists():
        return
    saved = OmegaConf.load(saved_file)
    for group in ("model", "scheme"):
        ours = OmegaConf.to_container(OmegaConf.structured(getattr(cfg, group)))
        theirs = OmegaConf.to_container(saved[group])
        if group == "model" and ours.get("vocab_size") is None:
            theirs["vocab_size"] = None  # filled from the tokenizer at run time
        if ours != theirs:
            differ = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
            raise ConfigError(
                f"{group}: {run_dir} holds checkpoints of another {group} "
                + ", ".join(f"{group}.{k}={theirs.get(k)} (now {ours.get(k)})" for k in differ)
                + f"; choose another run_dir for this {group}, or resume that run with its "
                "own config"
            )


def student_tokenizer(cfg: TrainConfig, teacher_path: Path | None, run_dir: Path, cache: Path):
    if teacher_path is not None:
        teacher_tok = load_tokenizer(str(teacher_path))
        if cfg.tokenizer.path:
            student_tok = load_tokenizer(cfg.tokenizer.path)
            if student_tok.fingerprint != teacher_tok.fingerprint:
                raise ConfigError(
                    f"tokenizer.path: the student's tokenizer {cfg.tokenizer.path} "
                    f"({student_tok.vocab_size} tokens, fingerprint {student_tok.fingerprint}) "
                    f"differs from the teacher's at {teacher_path} ({teacher_tok.vocab_size} "
                    f"tokens, {teacher_tok.fingerprint}); distillation needs one vocabulary: "
                    "drop tokenizer.path to use the teacher's"
                )
        return teacher_tok
    if cfg.tokenizer.path:
        return load_tokenizer(cfg.tokenizer.path)
    model_file = run_dir / "tokenizer.model"
    if model_file.exists():
        return load_tokenizer(str(model_file))
    return train_sentencepiece(iter_texts(cfg.data, cache), cfg.tokenizer.vocab_size, model_file)


def write_run_files(cfg: TrainConfig, run_dir: Path, ds_config: dict, tokenizer: Tokenizer):
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=1))
    (run_dir / "tokenizer.json").write_text(json.dumps(
        {"source": tokenizer.source, "fingerprint": tokenizer.fingerprint,
         "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id}, indent=1))


def build_run(cfg: TrainConfig, dist_info: Dist) -> Run:
    from deepspeed.accelerator import get_accelerator

    # Rank 0's path wins: an interpolation like ${now:...} may resolve differently per process.
    shared = [str(Path(cfg.run_dir).expanduser().resolve())]
    dist.broadcast_object_list(shared, src=0)
    run_dir = Path(shared[0])
    cache = Path(cfg.cache_dir).expanduser().resolve()
    grad_accum = cfg.grad_accum_steps(dist_info.world_size)
    ds_config = deepspeed_config(cfg, dist_info.world_size)
    resume_tag = resume_target(cfg, run_dir)
    if resume_tag:
        checkpoint.refuse_stage3_world_size_change(run_dir, resume_tag, dist_info.world_size,
                                                   cfg.zero.stage)
    if dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()

    teacher_path = on_rank0_first(dist_info, resolve_path, cfg.teacher)
    tokenizer = on_rank0_first(dist_info, student_tokenizer, cfg, teacher_path, run_dir, cache)
    shards = on_rank0_first(dist_info, ensure_shards, cfg.data, tokenizer, cache)
    train_data = TokenShards(shards, "train", cfg.data.seq_len, cfg.data.verify_checksums)
    val_data = TokenShards(shards, "val", cfg.data.seq_len, cfg.data.verify_checksums)
    val_data.check_ids(tokenizer.vocab_size)

    universal = bool(resume_tag) and checkpoint.needs_universal(
        run_dir, resume_tag, dist_info.world_size, cfg.zero.stage
    )
    if universal:
        on_rank0_first(dist_info, checkpoint.make_universal, run_dir, resume_tag)
        ds_config["checkpoint"] = {"load_universal": True}

    device = torch.device(get_accelerator().current_device_name())
    teacher = build_teacher(cfg, teacher_path, device, shards, train_data, tokenizer)
    vocab = teacher.vocab_size or tokenizer.vocab_size
    if cfg.model.vocab_size not in (None, vocab):
        raise ConfigError(
            f"model.vocab_size: {cfg.model.vocab_size} differs from the "
            f"{'tokenizer' if teacher.vocab_size is None else 'teacher'}'s {vocab}; "
            "leave it unset (null)"
        )
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))
    if dist_info.is_main:
        write_run_files(cfg, run_dir, ds_config, tokenizer)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    with build_context(cfg, ds_config):
        model = build_model(cfg.model, cfg.scheme)
    log.info(
        "student %s/%s: %.1fM parameters, vocab %d, world %d, grad accum %d",
        cfg.model.arch, cfg.scheme.name,
        sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()) / 1e6,
        vocab, dist_info.world_size, grad_accum,
    )
    engine = initialize(model, cfg, ds_config)
    torch.manual_seed(cfg.seed + dist_info.rank)  # then per-rank streams (e.g. dropout)
    return Run(cfg, dist_info, run_dir, device, tokenizer, train_data, val_data, engine,
               teacher, grad_accum, resume_tag, universal)

