"""Checkpoints: DeepSpeed's sharded state plus what an exact resume needs.

Layout: ``<run_dir>/checkpoints/step_00000100/`` holds DeepSpeed's files, one
``rng_rank<r>.pt`` per rank, and ``complete.json``, written by rank 0 after every rank has
finished. A folder without ``complete.json`` was cut off mid-write and is never resumed
from, so a crash at any moment leaves the previous checkpoint usable.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

COMPLETE = "complete.json"


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


def _write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


def save(engine, run_dir: Path, state: dict, rank: int, world_size: int, keep: int) -> Path:
    """``state`` holds at least ``step`` and ``consumed`` (global samples)."""
    tag = f"step_{state['step']:08d}"
    root = checkpoints_dir(run_dir)
    folder = root / tag
    if rank == 0 and folder.exists():  # a cut-off attempt at this very step
        shutil.rmtree(folder)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state=dict(state), save_latest=False)
    torch.save(_rng_state(), folder / f"rng_rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        _write_json_atomic(folder / COMPLETE, {**state, "world_size": world_size})
        for old in complete_tags(run_dir)[:-keep]:
            shutil.rmtree(root / old, ignore_errors=True)
        log.info("checkpoint %s", folder)
    dist.barrier()
    return folder


def load(engine, run_dir: Path, tag: str, rank: int) -> dict:
    """Restore model, optimizer, scheduler and (on the same world size) RNG; return state."""
    root = checkpoints_dir(run_dir)
    meta = json.loads((root / tag / COMPLETE).read_text())
    path, client_state = engine.load_checkpoint(
        str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {root / tag}")
    rng_file = root / tag / f"rng_rank{rank}.pt"
    if rng_file.exists():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    log.info("resumed from %s at step %d", root / tag, meta["step"])
    return {"step": int(meta["step"]), "consumed": int(meta["consumed"])}
