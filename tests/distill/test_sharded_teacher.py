"""An online teacher partitioned by its own ZeRO-3 engine beside a ZeRO-3 student (2 gloo
processes) gives the losses of the unsharded teacher in one process."""

from __future__ import annotations

import json

import pytest

from fbi_testing import REPO, run_train

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

WORKER = REPO / "tests" / "distill" / "sharded_teacher_worker.py"


def worker(tmp, base, overrides, nproc):
    tmp.mkdir(parents=True, exist_ok=True)
    run_train([str(tmp), *base, f"run_dir={tmp}/run", *overrides], nproc=nproc, script=WORKER)
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(nproc)]


def test_zero3_teacher_beside_zero3_student_matches_the_unsharded_teacher(
        tmp_path, corpus, teacher_dir):
    base = [
        f"cache_dir={tmp_path / 'cache'}", "teacher=hf", f"teacher.path={teacher_dir}",
        "teacher.dtype=float32", "data=files", f"data.files=[{corpus}/*.txt]", "data.seq_len=32",
        "data.val_fraction=0.05", "model.n_layers=2", "model.d_model=64", "model.d_ff=128",
        "model.n_heads=4", "global_batch_size=8", "micro_batch_size=4", "eval_batches=2",
        "optim.lr=3e-3", "optim.warmup_steps=2", "distill.ce_weight=0.2", "max_steps=3",
    ]
    (one,) = worker(tmp_path / "one", base, [], 1)
    ranks = worker(tmp_path / "two", base, ["zero=stage3", "teacher.zero3=true"], 2)
    for r in ranks:
        # Each rank keeps half of the teacher (DeepSpeed pads partitions), none of it trainable.
        assert r["teacher_local"] == pytest.approx(r["teacher_full"] / 2, rel=0.01)
        assert r["teacher_trainable"] == 0
        for name in ("loss", "distill", "ce"):
            assert [s[name] for s in r["steps"]] == pytest.approx(
                [s[name] for s in one["steps"]], rel=1e-5)
        assert r["eval"]["val_ppl_teacher"] == pytest.approx(one["eval"]["val_ppl_teacher"],
                                                             rel=1e-6)
    assert one["teacher_local"] == one["teacher_full"]
