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

import logging
import math
import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist

from fbi.distributed import shutdown_timeout

log = logging.getLogger(__name__)

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


def grace_s(checkpoint_bytes: float, write_gbps: float, step_s: float = 60.0) -> int:
    """Seconds a stop needs between the signal and the end of the job: the step in progress
    (``step_s``), the checkpoint written and hashed (its bytes at ``write_gbps`` GB/s, plus
    a quarter), and 30 s for the processes to end."""
    return math.ceil(step_s + 1.25 * checkpoint_bytes / (write_gbps * 1e9) + 30)


def advise_grace(checkpoint_bytes: float, write_gbps: float, step_s: float | None = None,
                 measured: str = "") -> None:
    """Log the grace a stop needs, for ``sbatch --signal=B:USR1@<s>`` and torchrun's
    shutdown timeout; a warning when torchrun's is shorter (it would KILL the workers in the
    middle of the checkpoint)."""
    need = grace_s(checkpoint_bytes, write_gbps, 60.0 if step_s is None else step_s)
    step = "a step (60 s assumed)" if step_s is None else f"a step of {step_s:.0f} s"
    log.info("grace: a checkpoint of about %.1f GB at %.2f GB/s%s, %s and exit need about "
             "%d s after a signal: sbatch --signal=B:USR1@%d (or more) and torchrun "
             "SHUTDOWN_TIMEOUT>=%d", checkpoint_bytes / 1e9, write_gbps, measured, step, need,
             need, need)
    timeout = shutdown_timeout(os.environ)
    if timeout is not None and timeout < need:
        log.warning("torchrun's shutdown timeout is %d s, below the %d s a checkpoint needs: "
                    "on a signal the workers would be killed mid-write. Export "
                    "SHUTDOWN_TIMEOUT=%d for launch/torchrun_node.sh", timeout, need, need)


def advise_after_save(folder: Path, seconds: float, step_metrics: dict) -> None:
    """The grace from a checkpoint just written in ``seconds`` (rank 0): its size, its
    measured rate, and the last step's time (its ``time_*_s`` metrics)."""
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    step_s = sum(v for k, v in step_metrics.items() if k.startswith("time_") and k.endswith("_s"))
    advise_grace(size, size / 1e9 / max(seconds, 1e-3), step_s,
                 f" (measured: {folder.name} in {seconds:.1f} s)")
