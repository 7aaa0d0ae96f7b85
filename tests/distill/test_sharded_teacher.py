"""An online teacher partitioned by its own ZeRO-3 engine beside a ZeRO-3 student (2 gloo
processes) gives the losses of the unsharded teacher in one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fbi_testing import held_by_rank0, read_steps, run_train

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def train(run_dir: Path, overrides: list[str], nproc: int) -> tuple[list[dict], dict, str]:
    """Step rows, the final evaluation row and the log of a train.py run."""
    proc = run_train([f"run_dir={run_dir}", *overrides], nproc=nproc)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return read_steps(run_dir), next(r for r in rows if "val_ppl_teacher" in r), proc.stderr


def test_zero3_teacher_beside_zero3_student_matches_the_unsharded_teacher(tmp_path, tiny_run):
    base = tiny_run + ["distill.ce_weight=0.2", "max_steps=3"]
    one_steps, one_eval, one_log = train(tmp_path / "one", base, 1)
    steps, evaluation, log = train(tmp_path / "two", base + ["zero=stage3", "teacher.zero3=true"], 2)
    # Rank 0 keeps half of the teacher (DeepSpeed pads partitions); one process all of it.
    held, total = held_by_rank0(log, "teacher")
    assert held == pytest.approx(total / 2, rel=0.01)
    assert held_by_rank0(one_log, "teacher") == (total, total)
    for name in ("loss", "distill", "ce"):
        assert [s[name] for s in steps] == pytest.approx([s[name] for s in one_steps], rel=1e-5)
    assert evaluation["val_ppl_teacher"] == pytest.approx(one_eval["val_ppl_teacher"], rel=1e-6)
