"""What happens after each step besides the update: small callbacks the loop calls in turn.

Each callback sees the run, the state after the step (``step``, ``consumed``) and the step's
metrics (which it may extend), and steers the loop through ``Control``: ask for a log row,
forbid the checkpoint of this step, ask for a rewind to the newest checkpoint, or halt.
Every callback is called on every rank at the same step, so it may use collectives. What a
callback needs to decide alike after a resume goes into the checkpoint (``state_dict``).
"""

from __future__ import annotations

from dataclasses import dataclass


class TrainingHalted(RuntimeError):
    """The run cannot go on sensibly (e.g. non-finite steps in a row); the message says why
    and what to do."""


@dataclass
class Control:
    log: bool = False  # write this step's metrics even off the logging interval
    save_allowed: bool = True  # False: this state must not become a checkpoint
    rewind: bool = False  # reload the newest checkpoint before the next step
    halt: str | None = None  # stop with this message (after the metrics are written)


class Callback:
    def after_step(self, run, state: dict, metrics: dict, control: Control) -> None:
        """Called after every optimizer step, on every rank."""

    def state_dict(self) -> dict:
        """What must survive a resume (or a rewind) to decide the same: saved in the
        checkpoint's ``complete.json``, so it is plain JSON."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Back to the state saved with the checkpoint just loaded."""
