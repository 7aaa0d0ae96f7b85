"""Hang diagnostics: every rank says where it is stuck, and a hang ends sooner.

- ``faulthandler`` is enabled, so a rank killed by a fatal signal (NCCL's watchdog aborts a
  rank whose collective timed out: SIGABRT) prints every thread's Python stack first;
- after each step a timer is armed: when no further step completes within 3/4 of
  ``step_timeout_s``, the rank prints every thread's Python stack (and goes on), so the rank
  that is stuck, not only the ones waiting for it, shows its frame. Before the timeout: once
  the waiting ranks' collectives time out they end, and their launcher kills the stuck rank;
- a wait the loop knows may be long and has its own deadline (a teacher cache still being
  written: ``teacher.cache.dead_after_s``) runs with the timer off (``suspended``);
- after the first step (compilation, data preparation, the first checkpoint's load are
  behind) the collective timeout drops from ``distributed.timeout_s`` to
  ``distributed.step_timeout_s``, as torchtitan does (``comm.train_timeout_seconds``).

NCCL's flight recorder (the last collectives of every rank, dumped on a timeout) is enabled
by fbi.distributed for NCCL groups; docs/clusters.md "Hangs" lists the environment.
"""

from __future__ import annotations

import faulthandler
import sys
from contextlib import contextmanager

from fbi.callbacks import Callback, Control
from fbi.distributed import set_collective_timeout


DUMP_AT = 0.75  # of step_timeout_s: the stacks are printed before the collectives time out


class HangWatch(Callback):
    """``step_timeout_s``: seconds; 0 turns the timer and the shorter timeout off."""

    def __init__(self, step_timeout_s: float):
        self.step_timeout_s = step_timeout_s
        self._shortened, self._armed = False, False
        faulthandler.enable(file=sys.stderr, all_threads=True)

    def after_step(self, run, state: dict, metrics: dict, control: Control) -> None:
        if not self.step_timeout_s:
            return
        if not self._shortened:
            set_collective_timeout(self.step_timeout_s)
            self._shortened = True
        self._arm()

    def _arm(self) -> None:
        faulthandler.dump_traceback_later(DUMP_AT * self.step_timeout_s, repeat=False,
                                          file=sys.stderr)
        self._armed = True

    @contextmanager
    def suspended(self):
        """No stacks while inside; the step's timer starts again after."""
        armed = self._armed
        faulthandler.cancel_dump_traceback_later()
        try:
            yield
        finally:
            if armed:
                self._arm()

    def close(self) -> None:
        """The steps are over (evaluation and teardown may take longer than one step)."""
        faulthandler.cancel_dump_traceback_later()
        self._armed = False
