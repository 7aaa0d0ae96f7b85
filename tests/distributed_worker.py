"""Started by torchrun in tests: a few steps through fbi's own setup and step function, then
one JSON file per rank with what the test compares (losses, a parameter digest, and how
many parameter elements DeepSpeed keeps on this rank).

    torchrun --nproc_per_node 2 tests/distributed_worker.py OUT_DIR override ...
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import deepspeed
import torch.distributed as dist

from fbi.config import compose
from fbi.data.sampler import GlobalSampler
from fbi.deepspeed_setup import init_distributed
from fbi.run import build_run
from fbi.loop import train_step



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
        losses.append(train_step(run, micro_batches)["loss"])
    params = list(run.engine.module.parameters())
    local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    full = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params)
    with deepspeed.zero.GatheredParameters(params, enabled=cfg.zero.stage == 3):
        digest = hashlib.sha256()
        for p in params:
            digest.update(p.detach().float().numpy().tobytes())
    (out / f"rank{run.dist.rank}.json").write_text(json.dumps({
        "losses": losses, "digest": digest.hexdigest(),
        "local_elements": local, "full_elements": full,
    }))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    os._exit(0)  # as train.py: DeepSpeed's CPU comm threads can abort interpreter teardown
