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

from fbi import atomic, checkpoint
from fbi.binarize import scale_parameter_names
from fbi.config import ConfigError, TrainConfig
from fbi.data.mixture import MixedShards, open_train
from fbi.data.prepare import ensure_shards, iter_texts
from fbi.data.shards import TokenShards
from fbi.data.tokenizer import Tokenizer, load_tokenizer, train_sentencepiece
from fbi.deepspeed_setup import (Dist, build_context, deepspeed_config, held_parameters,
                                  initialize)
from fbi.distill.teacher import build_teacher
from fbi.distill.teacher_checkpoint import TeacherSource, resolve_path
from fbi.models import build_model
from fbi.preemption import advise_grace

log = logging.getLogger("fbi")


@dataclass
class Run:
    cfg: TrainConfig
    dist: Dist
    run_dir: Path
    device: torch.device
    tokenizer: Tokenizer
    train_data: TokenShards | MixedShards
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


def check_same_tokenizer(run_dir: Path, tokenizer: Tokenizer) -> None:
    """A resumed run keeps its tokenizer: refuse before shards are built or the run files
    are rewritten."""
    saved_tok = run_dir / "tokenizer.json"
    if saved_tok.exists():
        theirs = json.loads(saved_tok.read_text())
        if theirs["fingerprint"] != tokenizer.fingerprint:
            raise ConfigError(
                f"tokenizer: {run_dir} was trained with the tokenizer {theirs['source']} "
                f"({theirs['vocab_size']} tokens, fingerprint {theirs['fingerprint']}), this run "
                f"has {tokenizer.source} ({tokenizer.vocab_size} tokens, "
                f"{tokenizer.fingerprint}); resume with the run's own teacher/tokenizer, or "
                "choose another run_dir"
            )


def check_same_vocabulary(run_dir: Path, vocab: int) -> None:
    """The student's vocabulary (the teacher's, which may pad the tokenizer's) as saved."""
    saved_cfg = run_dir / "config.yaml"
    if saved_cfg.exists():
        saved = OmegaConf.load(saved_cfg).model.get("vocab_size")
        if saved is not None and saved != vocab:
            raise ConfigError(
                f"model.vocab_size: the checkpoints in {run_dir} have a {saved}-token "
                f"vocabulary, this run {vocab}; resume with the run's own teacher/tokenizer, "
                "or choose another run_dir"
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
    atomic.write_text(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    atomic.write_json(run_dir / "ds_config.json", ds_config)
    atomic.write_json(run_dir / "tokenizer.json", {
        "source": tokenizer.source, "fingerprint": tokenizer.fingerprint,
        "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id})


def build_run(cfg: TrainConfig, dist_info: Dist) -> Run:
    from deepspeed.accelerator import get_accelerator

    # Rank 0's path wins: an interpolation like ${now:...} may resolve differently per process.
    shared = [str(Path(cfg.run_dir).expanduser().resolve())]
    dist.broadcast_object_list(shared, src=0)
    run_dir = Path(shared[0])
    cache = Path(cfg.cache_dir).expanduser().resolve()
    grad_accum = cfg.grad_accum_steps(dist_info.world_size)
    ds_config = deepspeed_config(cfg, dist_info.world_size)
    # The newest checkpoint whose files are intact (damaged newer ones are set aside).
    resume_tag = checkpoint.choose_resume(cfg, run_dir, dist_info.rank, dist_info.world_size)
    if dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()

    teacher_path = on_rank0_first(dist_info, resolve_path, cfg.teacher)
    tokenizer = on_rank0_first(dist_info, student_tokenizer, cfg, teacher_path, run_dir, cache)
    if resume_tag:
        check_same_tokenizer(run_dir, tokenizer)
    shards = on_rank0_first(dist_info, ensure_shards, cfg.data, tokenizer, cache)
    train_data = open_train(cfg.data, shards)
    val_data = TokenShards(shards, "val", cfg.data.seq_len, cfg.data.verify_checksums)
    val_data.check_ids(tokenizer.vocab_size, cfg.eval_batches * cfg.micro_batch_size)

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
    if resume_tag:
        check_same_vocabulary(run_dir, vocab)
    if dist_info.is_main:
        write_run_files(cfg, run_dir, ds_config, tokenizer)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    with build_context(cfg, ds_config):
        model = build_model(cfg.model, cfg.scheme)
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    log.info(
        "student %s/%s: %.1fM parameters, vocab %d, world %d, grad accum %d",
        cfg.model.arch, cfg.scheme.name, n_params / 1e6, vocab, dist_info.world_size, grad_accum,
    )
    needed = checkpoint.bytes_needed(run_dir, n_params, cfg.precision)
    checkpoint.check_space(run_dir, needed)
    if dist_info.is_main:
        advise_grace(needed, cfg.distributed.checkpoint_write_gbps)
    engine = initialize(model, cfg, ds_config)
    scales = scale_parameter_names(engine.module)
    shares = {
        "student": list(engine.module.parameters()),
        "scale": [p for n, p in engine.module.named_parameters() if n in scales],
        "teacher": list(getattr(teacher, "model", torch.nn.Module()).parameters()),
    }
    log.info("rank 0 holds %s", ", ".join(
        "%d of %d %s parameters" % (*held_parameters(params), name)
        for name, params in shares.items() if params))
    torch.manual_seed(cfg.seed + dist_info.rank)  # then per-rank streams (e.g. dropout)
    return Run(cfg, dist_info, run_dir, device, tokenizer, train_data, val_data, engine,
               teacher, grad_accum, resume_tag, universal)

