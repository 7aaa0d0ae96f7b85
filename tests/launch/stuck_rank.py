"""Two ranks all-reduce once per "step" with fbi's hang watch; rank 1 stops answering in
step 3 for ``sys.argv[1]`` seconds (a stuck rank). Started by torchrun from test_hang.py."""

import sys
import time

import torch
import torch.distributed as dist

from fbi.callbacks import Control
from fbi.callbacks.hang import HangWatch
from fbi.config import DistributedConfig
from fbi.distributed import init_distributed
from fbi.process_exit import run_and_exit


def main() -> None:
    stuck_s, step_timeout_s = float(sys.argv[1]), float(sys.argv[2])
    me = init_distributed(DistributedConfig(rendezvous_timeout_s=60, timeout_s=stuck_s * 4,
                                            step_timeout_s=step_timeout_s))
    watch = HangWatch(step_timeout_s)
    value = torch.ones(1)
    for step in range(1, 4):
        if me.rank == 1 and step == 3:
            time.sleep(stuck_s)  # the stuck rank's frame
        try:
            dist.all_reduce(value)
        except RuntimeError as err:
            print(f"rank {me.rank}: step {step} collective failed: {str(err).splitlines()[0]}",
                  flush=True)
            sys.exit(3)
        watch.after_step(None, {"step": step}, {}, Control())
    watch.close()
    print(f"rank {me.rank}: all steps done", flush=True)


run_and_exit(main)
