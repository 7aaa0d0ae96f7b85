"""Stop for preemption or by hand at a step boundary that every rank agrees on.

Two kinds of stop, told apart by the signal (as submitit does):

- preemption or time limit: SIGUSR1 (``sbatch --signal=B:USR1@<s>``, forwarded to the ranks
  by launch/slurm/train.sbatch, which then requeues the job) and SIGUSR2 (what submitit sends
  before the time limit; submitit requeues);
- cancellation: SIGTERM (``scancel``, torchrun stopping, SLURM preempting with its own
  requeue) and SIGINT (Ctrl-C). The job is not requeued by fbi.

Either way a signal only sets a flag. After each step the flags are all-reduced (max), so a
signal that reached some ranks stops all of them after the same step; the loop then writes a
checkpoint and returns normally, and ``resume=auto`` continues. A second SIGINT gives up
waiting for the step boundary and interrupts at once, as Ctrl-C usually does.

The flag is created before the teacher is loaded and the data prepared, so that a signal
during start-up stops the run after its first step instead of being lost.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

PREEMPTION = (signal.SIGUSR1, signal.SIGUSR2)
CANCELLATION = (signal.SIGTERM, signal.SIGINT)
SIGNALS = PREEMPTION + CANCELLATION


class PreemptionFlag:
    """Installs the handlers on creation; ``close()`` puts the previous ones back.
    ``device``: where the flag is all-reduced (NCCL reduces device tensors only); set it once
    the process group exists."""

    def __init__(self, device: torch.device = torch.device("cpu")):
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

    @property
    def preempted(self) -> bool:
        """This process received a preemption signal (USR1/USR2), not a cancellation."""
        return self.received in {s.name for s in PREEMPTION}

    def close(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def hand_over(self) -> None:
        """Once the checkpoint is written and the run closed: give a preemption signal to the
        handler that was there before, e.g. submitit's USR2 handler, which requeues the job
        (on rank 0) and exits. Call after ``close()``; a no-op without such a handler."""
        if not self.preempted:
            return
        signum = signal.Signals[self.received]
        previous = self._previous[signum]
        if callable(previous):
            previous(signum, None)
