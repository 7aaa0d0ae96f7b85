"""Bi-Mamba through train.py: a binary Mamba-2 student distilled from the tiny LLaMA teacher
learns on one process under ZeRO-3, 2 processes resuming its mid-run checkpoint (student
built under zero.Init) follow it step for step, and so do 2 processes under ZeRO-2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fbi_testing import run_train

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def losses(run_dir: Path) -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [m["loss"] for m in lines if "loss" in m]


def test_bimamba_learns_and_resumes_exactly_under_zero3(tmp_path, corpus, teacher_dir):
    base = [
        "experiment=bimamba_demo", f"cache_dir={tmp_path / 'cache'}", "teacher=hf",
        f"teacher.path={teacher_dir}", "teacher.dtype=float32", "data=files",
        f"data.files=[{corpus}/*.txt]", "data.seq_len=32", "data.val_fraction=0.05",
        "model.n_layers=2", "model.d_model=64", "model.d_state=16", "model.head_dim=16",
        "model.chunk_size=8", "scheme=fbi", "global_batch_size=8", "micro_batch_size=4",
        "logging.log_every=1", "eval_batches=2", "optim.lr=1e-2", "optim.warmup_steps=1",
        "optim.decay_steps=8", "max_steps=8",
        "zero=stage3", "checkpoint_every=4",
    ]
    # One process, 8 steps; then two processes resume a copy of its step-4 checkpoint (a
    # world-size change under ZeRO-3) and give the same losses for steps 5-8.
    one, two = tmp_path / "one", tmp_path / "two"
    run_train(base + [f"run_dir={one}"])
    reference = losses(one)
    assert sum(reference[-2:]) < sum(reference[:2]) - 0.05  # it learns
    shutil.copytree(one, two)
    shutil.rmtree(two / "checkpoints" / "step_00000008")
    proc = run_train(base + [f"run_dir={two}"], nproc=2)
    assert "resumed from" in proc.stderr
    assert losses(two)[8:] == pytest.approx(reference[4:], rel=1e-5)
    # ZeRO-2 (optimizer state and gradients partitioned, the model whole) on 2 processes.
    three = tmp_path / "three"
    run_train(base + [f"run_dir={three}", "zero=stage2", "max_steps=4"], nproc=2)
    assert losses(three) == pytest.approx(reference[:4], rel=1e-5)
