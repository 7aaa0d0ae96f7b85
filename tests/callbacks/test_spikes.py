"""The spike detector against a whole-history reference, with a window that stays bounded."""

from __future__ import annotations

import math

import numpy as np

from fbi.callbacks import Control
from fbi.callbacks.spikes import SkippedBatches, SpikeDetector
from fbi.config import GuardConfig


def reference_spikes(losses: list[float], window: int, z_max: float) -> list[int]:
    """Steps flagged by a z-score against the previous ``window`` kept losses, recomputed
    from the whole history at every step in float64 (spikes and non-finite losses are not kept)."""
    kept, flagged = [], []
    for step, loss in enumerate(losses, 1):
        if not math.isfinite(loss):
            continue
        recent = np.array(kept[-window:], dtype=np.float64)
        if len(recent) >= window // 2:
            std = max(recent.std(), 1e-6 * abs(recent.mean()), 1e-12)
            if (loss - recent.mean()) / std > z_max:
                flagged.append(step)
                continue
        kept.append(loss)
    return flagged


def run(detector: SpikeDetector, losses, first_step: int = 1) -> list[int]:
    flagged = []
    for step, loss in enumerate(losses, first_step):
        metrics = {"loss": loss}
        detector.after_step(None, {"step": step, "consumed": step * 4}, metrics, Control())
        if "spike_z" in metrics:
            flagged.append(step)
    return flagged


def test_spikes_match_the_whole_history_reference_and_the_window_stays_bounded(tmp_path):
    rng = np.random.default_rng(0)
    losses = (3.0 + 0.05 * rng.standard_normal(2_000)).tolist()
    for step in (100, 700, 701, 1500):
        losses[step] += 2.0
    losses[300] = float("nan")
    cfg = GuardConfig(spike_window=20, spike_z=6.0)
    detector = SpikeDetector(cfg, tmp_path, SkippedBatches(tmp_path, 4, True), True, lambda: False)
    assert run(detector, losses) == reference_spikes(losses, 20, 6.0)
    assert {101, 701, 702, 1501} <= set(reference_spikes(losses, 20, 6.0))
    assert len(detector.losses) == 20  # not 2,000: the per-step work stays constant


def test_a_resumed_detector_flags_what_an_uninterrupted_one_flags(tmp_path):
    rng = np.random.default_rng(1)
    losses = (2.0 + 0.1 * rng.standard_normal(400)).tolist()
    losses[250] += 3.0
    cfg = GuardConfig(spike_window=16, spike_z=5.0)
    make = lambda: SpikeDetector(cfg, tmp_path, SkippedBatches(tmp_path, 4, False),  # noqa: E731
                                 False, lambda: False)
    whole = run(make(), losses)
    first = make()
    part = run(first, losses[:200])
    second = make()
    second.load_state_dict(first.state_dict())
    assert part + run(second, losses[200:], first_step=201) == whole == [251]
