"""Stop for preemption or by hand at a step boundary that every rank agrees on.

SIGUSR1 (what launch/slurm/train.sbatch forwards before the time limit), SIGTERM (what
SLURM and torchrun send on preemption or cancellation) and SIGINT (Ctrl-C) only set a flag.
After each step the flags are all-reduced (max), so a signal that reached some ranks stops
all of them after the same step; the loop then writes a checkpoint and returns normally
(exit 0), and ``resume=auto`` continues. A second SIGINT gives up waiting for the step
boundary and interrupts at once, as Ctrl-C usually does.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


class PreemptionFlag:
    """Installs the handlers on creation; ``close()`` puts the previous ones back."""

    def __init__(self, device: torch.device):
        self.device = device
        self.received: str | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == "SIGINT":
            raise KeyboardInterrupt
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
