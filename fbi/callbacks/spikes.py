"""Loss spikes: a z-score against the previous finite losses (as llm.c's outlier detector
and OLMo-core's stability monitor do), logged to ``spikes.jsonl``; optionally a rewind.

With ``guard.spike_action=rewind`` the loop reloads the newest checkpoint and the spike's
batch is skipped from then on. The skip is recorded in ``skipped_batches.jsonl`` (the data
cursor of the batch), which every later start of the run reads, so a crash or resume after
a rewind trains on the same data order; the window of recent losses travels in the
checkpoint, so a resumed run flags the same spikes as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
from collections import deque
from pathlib import Path

from fbi.callbacks import Callback, Control
from fbi.config import GuardConfig

log = logging.getLogger("fbi")


class SkippedBatches:
    """Data cursors (global samples consumed) whose batch is never trained on."""

    FILE = "skipped_batches.jsonl"

    def __init__(self, run_dir: Path, global_batch_size: int, is_main: bool):
        self.path, self.batch, self.is_main = run_dir / self.FILE, global_batch_size, is_main
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        self.cursors = {json.loads(line)["consumed"] for line in lines if line.strip()}

    def cursor(self, consumed: int) -> int:
        """Where the next batch starts: ``consumed``, moved past skipped batches."""
        while consumed in self.cursors:
            consumed += self.batch
        return consumed

    def add(self, consumed: int, step: int, reason: str) -> None:
        self.cursors.add(consumed)
        if self.is_main:
            with open(self.path, "a") as f:
                f.write(json.dumps({"consumed": consumed, "step": step, "reason": reason}) + "\n")


class SpikeDetector(Callback):
    def __init__(self, cfg: GuardConfig, run_dir: Path, skips: SkippedBatches, is_main: bool,
                 can_rewind):
        self.cfg, self.skips, self.is_main = cfg, skips, is_main
        self.path = run_dir / "spikes.jsonl"
        self.can_rewind = can_rewind  # () -> bool: is there a checkpoint to go back to
        # (step, loss) of the last spike_window finite steps, spikes left out: bounded, so
        # the work per step does not grow with the length of the run.
        self.losses: deque[tuple[int, float]] = deque(maxlen=cfg.spike_window)

    def after_step(self, run, state, metrics, control: Control) -> None:
        step, loss = state["step"], metrics["loss"]
        if self.cfg.spike_action == "off" or metrics.get("skipped") or not math.isfinite(loss):
            return
        window = [value for _, value in self.losses]
        if len(window) >= self.cfg.spike_window // 2:
            mean = sum(window) / len(window)
            std = math.sqrt(sum((x - mean) ** 2 for x in window) / len(window))
            z = (loss - mean) / max(std, 1e-6 * abs(mean), 1e-12)
            if z > self.cfg.spike_z:
                self._spike(state, metrics, control, mean, std, z)
                return
        self.losses.append((step, loss))

    def _spike(self, state, metrics, control, mean, std, z) -> None:
        step = state["step"]
        # Rewinds so far are the skipped batches: a count that survives resumes and rewinds.
        rewind = (self.cfg.spike_action == "rewind"
                  and len(self.skips.cursors) < self.cfg.max_rewinds and self.can_rewind())
        metrics["spike_z"] = z
        control.log = True
        record = {"step": step, "loss": metrics["loss"], "window_mean": mean,
                  "window_std": std, "z": z, "action": "rewind" if rewind else "log"}
        if self.is_main:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        log.warning("loss spike at step %d: %.4f is %.1f standard deviations above the mean "
                    "%.4f of the last %d steps%s", step, metrics["loss"], z, mean,
                    len(self.losses),
                    "; rewinding to the newest checkpoint and skipping this batch" if rewind
                    else "")
        if rewind:
            started = state["consumed"] - self.skips.batch  # this step's first sample
            self.skips.add(started, step, f"loss spike z={z:.1f}")
            control.rewind, control.save_allowed = True, False

    def state_dict(self) -> dict:
        return {"losses": [[s, v] for s, v in self.losses]}

    def load_state_dict(self, state: dict) -> None:
        saved = sorted((int(s), float(v)) for s, v in state.get("losses", []))
        self.losses = deque(saved, maxlen=self.cfg.spike_window)
