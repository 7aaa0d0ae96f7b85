"""Checkpoint policy, in one place: which checkpoint a run resumes from, saving, retention,
the conversion for another world size, and the space a save needs.

Layout: ``<run_dir>/checkpoints/step_00000100/`` holds DeepSpeed's files, one
``rng_rank<r>.pt`` per rank, and ``complete.json``, written last by rank 0 once every rank
has finished. ``complete.json`` lists every file with its size and sha256, so a folder cut
off mid-write (no ``complete.json``), truncated or with a damaged file later is never
resumed from: the resume falls back to the previous complete checkpoint and says so, and the
damaged folder is renamed ``damaged_step_...`` (kept for inspection, never deleted by us).
The hashes are computed and checked by all ranks together, each over its share of the files
(the checkpoint folder is on a file system every rank sees, as DeepSpeed requires).

The data cursor is the number of global samples consumed, so the data side of a resume does
not depend on the world size. Under ZeRO 1-3 the optimizer state is partitioned by rank; a
resume on another world size converts the checkpoint once into DeepSpeed's universal format
(``<tag>/universal``) and loads that.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from fbi import atomic
from fbi.config import ConfigError, TrainConfig
from fbi.data.shards import sha256_file

log = logging.getLogger(__name__)

COMPLETE = "complete.json"
UNIVERSAL_INFO = "universal_checkpoint_info"
DAMAGED_PREFIX = "damaged_"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or none can be read; the message says what to do."""


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def step_of(tag: str) -> int:
    return int(tag.split("_")[-1])


def complete_tags(run_dir: Path) -> list[str]:
    """Folders that hold ``complete.json``, oldest first (not yet checked for damage)."""
    root = checkpoints_dir(run_dir)
    if not root.exists():
        return []
    return sorted(p.name for p in root.glob("step_*") if (p / COMPLETE).exists())


def read_meta(run_dir: Path, tag: str) -> dict:
    return json.loads((checkpoints_dir(run_dir) / tag / COMPLETE).read_text())


# --- which checkpoint to resume from ------------------------------------------------------

def resume_candidates(cfg: TrainConfig, run_dir: Path) -> list[str]:
    """Complete checkpoints a resume may use, newest first; refuses contradictions with
    ``resume`` and checkpoints of another student. Reads files only: safe before anything
    is written and before the process group exists."""
    tags = complete_tags(run_dir)
    if cfg.resume == "false" and tags:
        raise ConfigError(
            f"resume: {run_dir} already holds checkpoints ({tags[-1]}); pass resume=auto to "
            "continue that run, or choose another run_dir"
        )
    if cfg.resume == "true" and not tags:
        raise ConfigError(
            f"resume: resume=true but {checkpoints_dir(run_dir)} has no complete "
            "checkpoint; check run_dir, or pass resume=auto to start fresh"
        )
    if not tags or cfg.resume == "false":
        return []
    check_same_config(cfg, run_dir)
    try:
        newest_step = int(read_meta(run_dir, tags[-1])["step"])
    except (ValueError, KeyError):
        newest_step = step_of(tags[-1])
    if newest_step > cfg.max_steps:
        raise ConfigError(
            f"max_steps: {cfg.max_steps} is below the step {newest_step} of the newest "
            f"checkpoint in {run_dir}; pass max_steps >= {newest_step} to continue that run, "
            "or choose another run_dir"
        )
    return tags[::-1]


def resume_target(cfg: TrainConfig, run_dir: Path) -> str | None:
    """The newest complete checkpoint by name (damage is checked by ``choose_resume``)."""
    tags = resume_candidates(cfg, run_dir)
    return tags[0] if tags else None


# Fields a resume may change: where files live, how long to go on, how the work is spread
# over processes and what is logged or checked. Every other field defines the experiment
# (a prefix ending in "." covers its group).
RESUMABLE = (
    "run_dir", "cache_dir", "resume", "max_steps", "micro_batch_size", "threads",
    "checkpoint_every", "checkpoint_keep", "checkpoint_keep_every",
    "eval_batches", "eval_every", "eval_blimp", "logging.", "distributed.", "guard.",
    # ZeRO's layout but not its stage: the stage sets the checkpoint's format.
    "zero.offload_optimizer", "zero.offload_params", "zero.overlap_comm", "zero.bucket_size",
    "zero.activation_checkpointing", "zero.gather_signs", "zero.param_persistence_threshold",
    # Moved files: the tokenizer's fingerprint and the shards' own checks still apply.
    "teacher.path", "teacher.zero3", "teacher.cache.dir", "teacher.cache.wait_s",
    "teacher.cache.heartbeat_s", "teacher.cache.dead_after_s", "teacher.cache.verify",
    "teacher.cache.max_parts", "data.shards_dir", "data.verify_checksums",
)


def _resumable(key: str) -> bool:
    return any(key == r or (r.endswith(".") and key.startswith(r)) for r in RESUMABLE)


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_same_config(cfg: TrainConfig, run_dir: Path) -> None:
    """Refuse to resume checkpoints of another experiment (before anything is written): the
    saved ``config.yaml`` and this run's may differ only in ``RESUMABLE`` fields. A field
    one side lacks (a config written by another version of fbi) is not compared."""
    saved_file = run_dir / "config.yaml"
    if not saved_file.exists():
        return
    theirs = _flat(OmegaConf.to_container(OmegaConf.load(saved_file)))
    ours = _flat(OmegaConf.to_container(OmegaConf.structured(cfg)))
    if ours.get("model.vocab_size") is None:
        theirs.pop("model.vocab_size", None)  # filled from the tokenizer at run time
    differ = sorted(k for k in ours.keys() & theirs.keys()
                    if ours[k] != theirs[k] and not _resumable(k))
    if differ:
        raise ConfigError(
            f"{differ[0].split('.')[0]}: {run_dir} holds checkpoints of another experiment: "
            + ", ".join(f"{k}={theirs[k]} (now {ours[k]})" for k in differ)
            + "; choose another run_dir for this one, or resume that run with its own config "
            "(a resume may change only: " + ", ".join(RESUMABLE) + ")"
        )


def _my_share(files: list[str], rank: int, world_size: int) -> list[str]:
    return files[rank::world_size]


def damage(run_dir: Path, tag: str, rank: int, world_size: int) -> str | None:
    """Why ``tag`` cannot be resumed from, or None when every listed file is intact.

    A collective: every rank checks sizes, and the sha256 of its share of the files."""
    folder = checkpoints_dir(run_dir) / tag
    problem = None
    try:
        files = read_meta(run_dir, tag).get("files")
    except (OSError, ValueError) as err:
        problem, files = f"{COMPLETE} unreadable ({err})", None
    if files:  # checkpoints written before files were listed carry no list: trusted
        for name in sorted(files):
            path = folder / name
            if not path.exists():
                problem = f"{name} is missing"
                break
            if path.stat().st_size != files[name]["size"]:
                problem = (f"{name} has {path.stat().st_size} bytes, "
                           f"{files[name]['size']} were written")
                break
        else:
            for name in _my_share(sorted(files), rank, world_size):
                if sha256_file(folder / name) != files[name]["sha256"]:
                    problem = f"{name} does not match its sha256 (damaged after writing)"
                    break
    if world_size > 1:
        problems = [None] * world_size
        dist.all_gather_object(problems, problem)
        problem = next((p for p in problems if p), None)
    return problem


def choose_resume(cfg: TrainConfig, run_dir: Path, rank: int, world_size: int) -> str | None:
    """The newest undamaged complete checkpoint; damaged newer ones are set aside (renamed
    ``damaged_<tag>``) with a warning. A collective."""
    for tag in resume_candidates(cfg, run_dir):
        problem = damage(run_dir, tag, rank, world_size)
        if problem is None:
            return tag
        aside = checkpoints_dir(run_dir) / f"{DAMAGED_PREFIX}{tag}"
        log.warning("checkpoint %s is damaged: %s; set aside as %s, trying the previous one",
                    tag, problem, aside.name)
        if world_size > 1:
            dist.barrier()
        if rank == 0:
            shutil.rmtree(aside, ignore_errors=True)
            (checkpoints_dir(run_dir) / tag).rename(aside)
        if world_size > 1:
            dist.barrier()
    if cfg.resume == "true":
        raise CheckpointError(
            f"resume: resume=true but every checkpoint in {checkpoints_dir(run_dir)} is "
            "damaged (set aside as damaged_*); pass resume=auto to start afresh"
        )
    return None


# --- saving -------------------------------------------------------------------------------

def _rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _all_ok(ok: bool, world_size: int, device) -> bool:
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    if world_size > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def save(engine, run_dir: Path, state: dict, rank: int, world_size: int, keep: int,
         keep_every: int | None = None) -> Path:
    """``state`` holds ``step`` and ``consumed`` (global samples), and may hold more
    (the callbacks' state): all of it lands in ``complete.json``. A failed write
    (disk full, unwritable folder) on any rank removes the partial folder and raises
    ``CheckpointError`` on every rank; earlier checkpoints are untouched."""
    tag = f"step_{state['step']:08d}"
    root = checkpoints_dir(run_dir)
    folder = root / tag
    if rank == 0 and folder.exists():  # a cut-off attempt at this very step
        shutil.rmtree(folder)
    if world_size > 1:
        dist.barrier()
    # The universal-checkpoint marker lets ds_to_universal convert this checkpoint later.
    client_state = {**state, UNIVERSAL_INFO: {"universal_checkpoint_version": 0.2}}
    error = None
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
        torch.save(_rng_state(), folder / f"rng_rank{rank}.pt")
    except (OSError, RuntimeError) as err:  # torch reports a full disk as a RuntimeError
        error = f"rank {rank}: {str(err).splitlines()[0]}"
    if not _all_ok(error is None, world_size, engine.device):
        if rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
        previous = complete_tags(run_dir)
        raise CheckpointError(
            f"checkpoint: writing {folder} failed ({error or 'on another rank'}); "
            f"{_size(shutil.disk_usage(root).free)} free there. The partial folder "
            f"is removed and {previous[-1] if previous else 'no earlier checkpoint'} is "
            "intact: free space or fix the folder's permissions, then rerun the same command "
            "to resume"
        )
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    mine = {name: {"size": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)}
            for name in _my_share(files, rank, world_size)}
    shares = [mine]
    if world_size > 1:
        shares = [None] * world_size
        dist.all_gather_object(shares, mine)
    if rank == 0:
        listed = {name: entry for share in shares for name, entry in share.items()}
        atomic.write_json(folder / COMPLETE, {**state, "world_size": world_size, "files": listed})
        retain(run_dir, keep, keep_every)
        log.info("checkpoint %s", folder)
    if world_size > 1:
        dist.barrier()
    return folder


def retain(run_dir: Path, keep: int, keep_every: int | None) -> None:
    """Keep the newest ``keep`` complete checkpoints and every ``keep_every``-th step; delete
    the others and the cut-off folders older than the newest complete one.

    ``complete.json`` goes first, so a kill in the middle of a deletion leaves an incomplete
    folder (never picked, removed next time), never a complete-looking one with files gone."""
    root = checkpoints_dir(run_dir)
    tags = complete_tags(run_dir)
    if not tags:
        return
    kept = set(tags[-keep:]) | {t for t in tags if keep_every and step_of(t) % keep_every == 0}
    newest = step_of(tags[-1])
    for folder in root.glob("step_*"):
        complete = (folder / COMPLETE).exists()
        if (complete and folder.name not in kept) or (not complete and step_of(folder.name) < newest):
            (folder / COMPLETE).unlink(missing_ok=True)
            shutil.rmtree(folder, ignore_errors=True)


def bytes_needed(run_dir: Path, n_params: int, precision: str) -> int:
    """Space one more checkpoint takes: the newest one's size when there is one, else model
    weights plus Adam's two fp32 moments (plus the fp32 master copy in bf16/fp16; bf16_mixed
    keeps fp32 weights)."""
    tags = complete_tags(run_dir)
    if tags:
        return sum(p.stat().st_size for p in (checkpoints_dir(run_dir) / tags[-1]).rglob("*")
                   if p.is_file())
    per_param = 4 + 8 if precision in ("fp32", "bf16_mixed") else 2 + 12
    return n_params * per_param


def check_space(run_dir: Path, needed: int) -> None:
    """Refuse to start when the next checkpoint cannot be written: the previous one stays on
    disk while a new one is written, so a full save must fit in the free space."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if free < needed * 1.1:
        raise CheckpointError(
            f"checkpoint: {root} has {_size(free)} free, and one checkpoint of this "
            f"run takes about {_size(needed)} (written beside the previous one); "
            "free space, move run_dir to a larger file system, or lower checkpoint_keep"
        )


# --- world-size changes and loading -------------------------------------------------------

def saved_world_size(run_dir: Path, tag: str) -> int:
    return int(read_meta(run_dir, tag)["world_size"])


def needs_universal(run_dir: Path, tag: str, world_size: int, zero_stage: int) -> bool:
    """Partitioned optimizer state (ZeRO >= 1) saved by another number of ranks."""
    return zero_stage > 0 and saved_world_size(run_dir, tag) != world_size


def make_universal(run_dir: Path, tag: str) -> None:
    """Convert ``tag`` into DeepSpeed's world-size-free format, once (rank 0 only)."""
    folder = checkpoints_dir(run_dir) / tag
    target = folder / "universal"
    if (target / COMPLETE).exists():
        return
    shutil.rmtree(target, ignore_errors=True)
    log.info("converting %s to a universal checkpoint for a new world size", folder)
    subprocess.run(
        [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
         "--input_folder", str(folder), "--output_folder", str(target)],
        check=True, capture_output=True,
    )
    atomic.write_json(target / COMPLETE, read_meta(run_dir, tag))


def _repair_universal_optimizer(optimizer, own_hyperparameters: list[dict]) -> None:
    """Undo two slips of DeepSpeed 0.19's ZeRO-3 universal loader, which made a resume on
    another world size leave the uninterrupted run from its first update:
    - it gives every parameter group the first group's hyperparameters, so the groups that
      are not decayed would be; each group gets its own back (the learning rate stays the
      checkpoint's: it is the scheduler's position);
    - it gives all parameter groups one shared step tensor, which Adam then advances once per
      group per step, skewing the bias correction; each gets its own copy."""
    for group, hyper in zip(optimizer.param_groups, own_hyperparameters):
        group.update(hyper)
    for state in getattr(optimizer, "optimizer", optimizer).state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def load(engine, run_dir: Path, tag: str, rank: int, world_size: int, universal: bool) -> dict:
    """Restore model, optimizer, scheduler and (on the same world size) RNG; return state."""
    root = checkpoints_dir(run_dir)
    meta = read_meta(run_dir, tag)
    load_dir, load_tag = (root / tag, "universal") if universal else (root, tag)
    own = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")}
           for g in engine.optimizer.param_groups]
    path, _ = engine.load_checkpoint(
        str(load_dir), tag=load_tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {load_dir / load_tag}")
    if universal:
        _repair_universal_optimizer(engine.optimizer, own)
    if meta["world_size"] == world_size:  # per-rank streams only map 1:1 on the same ranks
        _set_rng_state(torch.load(root / tag / f"rng_rank{rank}.pt", weights_only=False))
    log.info("resumed from %s at step %d", root / tag, meta["step"])
    return {"step": int(meta["step"]), "consumed": int(meta["consumed"]),
            "callbacks": meta.get("callbacks", {})}
