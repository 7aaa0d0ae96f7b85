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


PRECISION_PROBE = """
import json, os, sys, copy, torch, deepspeed
from fbi.process_exit import run_and_exit
def main():
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    deepspeed.init_distributed("gloo")
    from fbi.configure import compose
    from fbi.deepspeed_setup import deepspeed_config, initialize
    from fbi.models import build_model
    cfg = compose(["experiment=bimamba_demo", f"precision={sys.argv[1]}", "model.n_layers=2",
                   "model.d_model=64", "model.d_state=16", "model.head_dim=16", "model.chunk_size=8",
                   "model.vocab_size=64", "model.residual_in_fp32=true", "global_batch_size=2",
                   "micro_batch_size=2", "max_steps=1", "optim.impl=torch"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.scheme)
    reference = copy.deepcopy(model)  # fp32 throughout, no autocast
    engine = initialize(model, cfg, deepspeed_config(cfg, 1))
    seen = {}
    def probe(mixer, args):
        seen.update({n: str(getattr(mixer, n).dtype) for n in ("A_log", "dt_bias", "D")})
        seen["alpha"] = str(mixer.in_proj.alpha.dtype)
    engine.module.backbone.layers[0].mixer.register_forward_pre_hook(probe)
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))
    loss = lambda logits: torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids.flatten())
    ours, ref = loss(engine(ids)).item(), loss(reference(ids)).item()
    print(json.dumps({"dtypes": seen, "loss": ours, "reference": ref}))
run_and_exit(main)  # DeepSpeed's gloo threads can abort the interpreter's teardown
"""


@pytest.mark.parametrize("precision,ssm_dtype", [("bf16_mixed", "torch.float32"),
                                                 ("bf16", "torch.bfloat16")])
def test_bf16_mixed_keeps_the_ssm_parameters_fp32_in_the_forward(tmp_path, precision, ssm_dtype):
    """Through fbi's DeepSpeed set-up on one gloo process: under precision=bf16_mixed (the
    Bi-Mamba recipes') the module the forward runs holds A_log, dt_bias, D and the scales in
    fp32, and the loss equals the fp32 model's within bf16 tolerance; precision=bf16 casts
    them (what the recipes no longer do)."""
    import subprocess
    import sys

    from fbi_testing import REPO, free_port

    script = tmp_path / "probe.py"
    script.write_text(PRECISION_PROBE)
    proc = subprocess.run([sys.executable, str(script), precision, str(free_port())], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["dtypes"] == {"A_log": ssm_dtype, "dt_bias": ssm_dtype, "D": ssm_dtype,
                             "alpha": ssm_dtype}
    assert out["loss"] == pytest.approx(out["reference"], rel=1e-2)
