"""Checkpoints: DeepSpeed's sharded state plus what an exact resume needs.

Layout: ``<run_dir>/checkpoints/step_00000100/`` holds DeepSpeed's files, one
``rng_rank<r>.pt`` per rank, and ``complete.json``, written by rank 0 after every rank has
finished. A folder without ``complete.json`` was cut off mid-write and is never resumed
from, so a crash at any moment leaves the previous checkpoint usable.

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

from fbi import atomic

log = logging.getLogger(__name__)

COMPLETE = "complete.json"
UNIVERSAL_INFO = "universal_checkpoint_info"


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def complete_tags(run_dir: Path) -> list[str]:
    """Complete checkpoint folders, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.exists():
        return []
    return sorted(p.name for p in root.glob("step_*") if (p / COMPLETE).exists())


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


def save(engine, run_dir: Path, state: dict, rank: int, world_size: int, keep: int) -> Path:
    """``state`` holds at least ``step`` and ``consumed`` (global samples)."""
    tag = f"step_{state['step']:08d}"
    root = checkpoints_dir(run_dir)
    folder = root / tag
    if rank == 0 and folder.exists():  # a cut-off attempt at this very step
        shutil.rmtree(folder)
    dist.barrier()
    # The universal-checkpoint marker lets ds_to_universal convert this checkpoint later.
    client_state = {**state, UNIVERSAL_INFO: {"universal_checkpoint_version": 0.2}}
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    torch.save(_rng_state(), folder / f"rng_rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        atomic.write_json(folder / COMPLETE, {**state, "world_size": world_size})
        for old in complete_tags(run_dir)[:-keep]:
            shutil.rmtree(root / old, ignore_errors=True)
        log.info("checkpoint %s", folder)
    dist.barrier()
    return folder


def saved_world_size(run_dir: Path, tag: str) -> int:
    return int(json.loads((checkpoints_dir(run_dir) / tag / COMPLETE).read_text())["world_size"])


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
    atomic.write_json(target / COMPLETE, json.loads((folder / COMPLETE).read_text()))


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
    meta = json.loads((root / tag / COMPLETE).read_text())
    load_dir, load_tag = (root / tag, "universal") if universal else (root, tag)
    own = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")}
           for g in engine.optimizer.param_groups]
    path, _ = engine.load_checkpoint(
        str(load_dir), tag=load_tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {load_dir / load_tag}")
    if universal:
        _repair_universal_optimizer(engine.optimizer, own)
    if meta["world_size"] == world_size:  # per-rank streams only map 1:1 on the same ranks
        _set_rng_state(torch.load(root / tag / f"rng_rank{rank}.pt", weights_only=False))
    log.info("resumed from %s at step %d", root / tag, meta["step"])
    return {"step": int(meta["step"]), "consumed": int(meta["consumed"])}
