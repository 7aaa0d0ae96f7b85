"""Started by torchrun in tests: a few training steps through fbi's own setup and step, then
one JSON file per rank with the losses and how many teacher weights this rank keeps.

    torchrun --nproc_per_node 2 tests/distill/sharded_teacher_worker.py OUT_DIR override ...
"""

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist
from fbi.config import compose
from fbi.data.sampler import GlobalSampler
from fbi.deepspeed_setup import init_distributed
from fbi.loop import evaluate, train_step
from fbi.run import build_run

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    cfg = compose(overrides)
    run = build_run(cfg, init_distributed())
    sampler = GlobalSampler(run.train_data.num_samples, cfg.seed)
    losses = []
    for step in range(cfg.max_steps):
        micro_batches = [
            sampler.micro_batch_ids(step * cfg.global_batch_size, cfg.micro_batch_size, a,
                                    run.dist.rank, run.dist.world_size)
            for a in range(run.grad_accum)
        ]
        losses.append(train_step(run, micro_batches))
    params = list(run.teacher.model.parameters())
    (out / f"rank{run.dist.rank}.json").write_text(json.dumps({
        "steps": losses, "eval": evaluate(run),
        "teacher_local": sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
                             for p in params),
        "teacher_full": sum(getattr(p, "ds_numel", p.numel()) for p in params),
        "teacher_trainable": sum(p.requires_grad for p in params),
    }))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    os._exit(0)  # as train.py: DeepSpeed's CPU comm threads can abort interpreter teardown
