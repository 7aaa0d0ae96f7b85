"""Gradients reduce-scattered in bf16 against fp32 (``zero.grad_dtype``) under ZeRO-3 in bf16:
the training loss of a demo-like run over a few hundred steps, set beside the spread between
two seeds of the fp32 run.

    python bench/grad_reduce_dtype.py [--steps 300] [--nproc 2] [--window 50] [overrides ...]

Runs ``train.py`` three times under torchrun (gloo on CPU) with the same overrides: fp32
reduction with ``seed=0`` and ``seed=1``, bf16 reduction (``zero.grad_dtype=model``: the
gradients travel and accumulate in the model's bf16) with ``seed=0``. Default run: the demo's
student and corpus without a teacher (cross-entropy, a 2,048-token sentencepiece vocabulary),
ZeRO-3 on the 1-bit route, 2 micro-batches per step. Prints the mean loss over the last
``--window`` steps of each run and the mean absolute gap between the curves there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULTS = ["experiment=demo", "teacher=none", "tokenizer.vocab_size=2048",
            "model.vocab_size=2048", "zero=stage3", "precision=bf16",
            "zero.param_persistence_threshold=10000", "zero.gather_signs=true",
            "global_batch_size=8", "micro_batch_size=2", "data.seq_len=64", "eval_batches=0",
            "logging.log_every=1", "optim.warmup_steps=20"]


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def train(overrides: list[str], nproc: int, run_dir: Path) -> dict[int, float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(nproc), str(REPO / "train.py"), *overrides, f"run_dir={run_dir}"]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    return losses(run_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--window", type=int, default=50)
    args, extra = parser.parse_known_args()
    common = DEFAULTS + [f"max_steps={args.steps}", f"checkpoint_every={args.steps}", *extra]
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, grad, seed in (("fp32, seed 0", "fp32", 0), ("bf16, seed 0", "model", 0),
                                 ("fp32, seed 1", "fp32", 1)):
            runs[name] = train(common + [f"zero.grad_dtype={grad}", f"seed={seed}"],
                               args.nproc, Path(tmp) / name.replace(", ", "-").replace(" ", ""))
    last = sorted(runs["fp32, seed 0"])[-args.window:]

    def mean(name):
        return sum(runs[name][s] for s in last) / len(last)

    def gap(a, b):
        return sum(abs(runs[a][s] - runs[b][s]) for s in last) / len(last)

    print(f"{args.steps} steps, {args.nproc} ranks, ZeRO-3 bf16; mean loss over the last "
          f"{len(last)} steps (first logged loss {runs['fp32, seed 0'][min(runs['fp32, seed 0'])]:.4f}):")
    print("| gradients reduced in | seed | mean loss | mean abs gap to fp32, seed 0 |")
    print("|---|---|---|---|")
    for name in runs:
        dtype, seed = name.split(", seed ")
        print(f"| {dtype} | {seed} | {mean(name):.4f} | {gap(name, 'fp32, seed 0'):.4f} |")
    print(f"bf16 - fp32 (same seed): {mean('bf16, seed 0') - mean('fp32, seed 0'):+.4f}; "
          f"seed 1 - seed 0 (fp32): {mean('fp32, seed 1') - mean('fp32, seed 0'):+.4f}")


if __name__ == "__main__":
    main()
