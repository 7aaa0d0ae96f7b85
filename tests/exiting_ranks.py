"""Gloo ranks that all-reduce, print without flushing and leave through fbi.process_exit.
Started by torchrun from test_process_exit.py; ``sys.argv[1]``: ``done``, or ``raise`` (rank 1
raises after the collective).

The abort that DeepSpeed's communication threads sometimes cause in the interpreter's teardown
cannot be produced on demand; an atexit handler that aborts stands in for it: a process that
ran the teardown would die of SIGABRT after its work, as rank 0 of bench/zero3_traffic.py did.
The rank that raises does run it: its traceback is printed first, and its status is SIGABRT's."""

import atexit
import os
import sys

import torch
import torch.distributed as dist

from fbi.process_exit import run_and_exit


def main() -> None:
    dist.init_process_group("gloo")
    total = torch.ones(1)
    dist.all_reduce(total)
    rank = dist.get_rank()
    print(f"rank {rank}: sum {total.item():g}")  # into torchrun's log file: block-buffered
    dist.destroy_process_group()
    if sys.argv[1] == "raise" and rank == 1:
        raise ValueError("rank 1 fails after the collective")


atexit.register(os.abort)
run_and_exit(main)
