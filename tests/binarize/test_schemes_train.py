"""Every scheme through train.py on the tiny model: it learns (1 process), and under ZeRO-3
with 2 gloo processes it follows the 1-process run (so each quantizer saw the gathered weight,
not its shard) and resumes exactly from a mid-run checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fbi_testing import run_train

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

SCHEMES = ["scheme=bitnet", "scheme=bitnet158", "scheme=onebit", "scheme=pbllm",
           "scheme=fbi_w1a1"]


def losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)]


@pytest.fixture(scope="module")
def base(tmp_path_factory, corpus, teacher_dir) -> list[str]:
    return [
        f"cache_dir={tmp_path_factory.mktemp('cache')}", "teacher=hf", f"teacher.path={teacher_dir}",
        "teacher.dtype=float32", "data=files", f"data.files=[{corpus}/*.txt]", "data.seq_len=32",
        "data.val_fraction=0.05", "model.n_layers=2", "model.d_model=64", "model.d_ff=128",
        "model.n_heads=4", "global_batch_size=8", "micro_batch_size=4", "logging.log_every=1",
        "eval_batches=2", "optim.lr=1e-2", "optim.warmup_steps=1", "optim.decay_steps=8",
        "distill.ce_weight=0.0", "max_steps=8",
    ]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_scheme_learns_and_resumes_exactly_under_zero3(tmp_path, base, scheme):
    from fbi.consolidate import consolidate

    one = tmp_path / "one"
    run_train(base + [scheme, f"run_dir={one}"])
    reference = losses(one)
    assert sum(reference[-2:]) < sum(reference[:2])  # it learns

    split = base + [scheme, f"run_dir={tmp_path / 'split'}", "zero=stage3", "checkpoint_every=4"]
    run_train(split + ["max_steps=4"], nproc=2)
    proc = run_train(split, nproc=2)
    assert "resumed from" in proc.stderr
    assert losses(tmp_path / "split") == pytest.approx(reference, rel=1e-5)
    state = consolidate(tmp_path / "split")
    ours = {k: v for k, v in state.items() if k.endswith((".alpha", ".beta", ".g", ".h"))}
    assert bool(ours) == (scheme in ("scheme=onebit", "scheme=fbi_w1a1"))
    for v in state.values():
        assert torch.isfinite(v).all()
