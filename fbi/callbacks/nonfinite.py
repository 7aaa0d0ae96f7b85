"""Non-finite loss or gradient norm: skip the update, count it, halt after too many in a row.

DeepSpeed's ZeRO (1-3) and bf16/fp16 optimizers already skip an update whose gradient norm
is not finite (``engine.skipped_steps``). The plain torch optimizer of ZeRO-0 in fp32 does
not: ``nonfinite_update`` computes the global gradient norm (the gradients are reduced
across ranks by then), and ``update_skipped`` turns the optimizer's step into nothing for a
non-finite step, so that parameters and optimizer state stay as they were. DeepSpeed still
runs its bookkeeping around it (gradient clipping of zeroed gradients, the step counter, the
learning-rate schedule).
"""

from __future__ import annotations

import contextlib
import math

import torch

from fbi.callbacks import Callback, Control


def nonfinite_update(engine, loss_sums: torch.Tensor) -> tuple[float | None, bool]:
    """Before the boundary ``engine.step()``: (gradient norm, whether the update must be
    skipped); (None, False) when DeepSpeed's own optimizer guards the step."""
    if not isinstance(engine.optimizer, torch.optim.Optimizer):
        return None, False
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    norm = float(torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads])
    )) if grads else 0.0
    return norm, not (math.isfinite(norm) and bool(torch.isfinite(loss_sums).all()))


@contextlib.contextmanager
def update_skipped(engine, skip: bool):
    """Around ``engine.step()``: when ``skip``, the optimizer's step does nothing."""
    if not skip:
        yield
        return
    engine.optimizer.zero_grad(set_to_none=False)  # finite zeros for DeepSpeed's clipping
    engine.optimizer.step = lambda closure=None: None  # shadows the class's step
    try:
        yield
    finally:
        del engine.optimizer.step


class NonFiniteGuard(Callback):
    def __init__(self, max_in_a_row: int, last_checkpoint):
        self.max_in_a_row = max_in_a_row
        self.last_checkpoint = last_checkpoint  # () -> tag or None, for the message
        self.total = 0
        self.streak: list[int] = []

    def after_step(self, run, state, metrics, control: Control) -> None:
        if not metrics.get("skipped"):
            self.streak = []
            return
        self.total += 1
        self.streak.append(state["step"])
        metrics["skipped_total"] = self.total
        control.log = True
        # The parameters are those of the last applied update, which led here: not a state
        # to keep. The newest checkpoint predates the streak and must survive retention.
        control.save_allowed = False
        if len(self.streak) >= self.max_in_a_row:
            tag = self.last_checkpoint()
            control.halt = (
                f"non-finite loss or gradient norm at {len(self.streak)} steps in a row "
                f"(steps {self.streak[0]}-{self.streak[-1]}, last loss {metrics.get('loss')}, "
                f"grad_norm {metrics.get('grad_norm')}); their updates were skipped and the "
                "run stopped. "
                + (f"The newest checkpoint {tag}, written before them, is kept: resume from "
                   "it with a lower optim.lr, a tighter optim.grad_clip, or precision=fp32"
                   if tag else "No checkpoint was written before them: start again with a "
                   "lower optim.lr, a tighter optim.grad_clip, or precision=fp32")
                + " (guard.max_nonfinite_steps sets how many in a row are tolerated)"
            )
