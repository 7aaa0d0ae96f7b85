"""Stop for preemption at a step boundary that every rank agrees on.

SIGUSR1 (what launch/slurm/train.sbatch forwards before the time limit) and SIGTERM (what
SLURM and torchrun send on preemption or cancellation) only set a flag. After each step the
flags are all-reduced (max), so a signal that reached some ranks stops all of them after
the same step; the loop then writes a checkpoint and returns, and ``resume=auto`` continues.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionFlag:
    """Installs the handlers on creation; ``close()`` puts the previous ones back."""

    def __init__(self, device: torch.device):
        self.device = device
        self.received: str | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def agreed(self, world_size: int) -> bool:
        """True on every rank when any rank has received a signal (a collective: call it on
        all ranks at the same point)."""
        flag = torch.tensor([1.0 if self.received else 0.0], device=self.device)
        if world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def close(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
