"""Per-rank memory of parameters + optimizer state, and step time, for ZeRO stages 0-3.

    python bench/zero_stages.py [--model fbi_130m] [--procs 2] [--seq-len 128] [--steps 4]

Starts one torchrun job per stage (gloo on CPU, NCCL on GPUs) on the same model and random
tokens, and prints one table: the bytes DeepSpeed keeps on each rank (its partitioned
parameter tensors, its fp32 master partition and the optimizer's state tensors, counted from
the tensors themselves), and the mean step time relative to stage 0 from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fbi.process_exit import run_and_exit  # noqa: E402


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from fbi.configure import compose
    from fbi.deepspeed_setup import deepspeed_config, init_distributed, initialize
    from fbi.models import build_model

    cfg = compose([
        f"model={args.model}", f"zero=stage{args.stage}", "teacher=none",
        f"model.vocab_size={args.vocab}", f"global_batch_size={args.nproc}",
        "micro_batch_size=1", "optim.warmup_steps=1",
    ])
    info = init_distributed()
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.scheme.name, cfg.scheme.binarize)
    engine = initialize(model, cfg, deepspeed_config(cfg, info.world_size))
    params = list(engine.module.parameters())
    param_bytes = tensor_bytes(p.ds_tensor if hasattr(p, "ds_tensor") else p for p in params)
    tokens = torch.randint(0, args.vocab, (1, args.seq_len + 1), device=engine.device)
    times = []
    for _ in range(args.steps + 1):
        start = time.perf_counter()
        logits = engine(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[0, 1:])
        engine.backward(loss)
        engine.step()
        dist.barrier()
        times.append(time.perf_counter() - start)
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    state = [t for s in inner.state.values() for t in s.values() if torch.is_tensor(t)]
    # ZeRO keeps an fp32 master partition beside the torch optimizer's own tensors
    # (stages 1/2 and stage 3 name it differently).
    masters = getattr(engine.optimizer, "single_partition_of_fp32_groups", None) or getattr(
        engine.optimizer, "fp32_partitioned_groups_flat", [])
    optim_bytes = tensor_bytes(state) + tensor_bytes(masters)
    if info.rank == 0:
        Path(args.out).write_text(json.dumps({
            "param_bytes": param_bytes, "optim_bytes": optim_bytes,
            "step_s": sum(times[1:]) / args.steps,
            "n_params": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params),
        }))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="fbi_130m")
    parser.add_argument("--procs", dest="nproc", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--stage", type=int)
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.stage is not None:
        return worker(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for stage in (0, 1, 2, 3):
            out = Path(tmp) / f"stage{stage}.json"
            subprocess.run(
                [sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc_per_node", str(args.nproc), __file__, "--stage", str(stage),
                 "--out", str(out), "--model", args.model, "--procs", str(args.nproc),
                 "--seq-len", str(args.seq_len), "--steps", str(args.steps),
                 "--vocab", str(args.vocab)],
                check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            rows.append((stage, json.loads(out.read_text())))
    base = rows[0][1]["step_s"]
    n = rows[0][1]["n_params"]
    print(f"{args.model}: {n / 1e6:.1f}M parameters, {args.nproc} processes, "
          f"sequence {args.seq_len}, {args.steps} timed steps")
    print("stage  params/rank MB  optimizer/rank MB  step s  vs stage 0")
    for stage, r in rows:
        print(f"{stage:5d}  {r['param_bytes'] / 2**20:14.1f}  {r['optim_bytes'] / 2**20:17.1f}"
              f"  {r['step_s']:6.2f}  {r['step_s'] / base:10.2f}")


if __name__ == "__main__":
    run_and_exit(main)  # its ranks too: a teardown abort would fail the stage
