"""Per-seed results of the studies (``bench/*_study.py``) on disk, and the tables made from
them: mean ± sd per row, and paired differences against a baseline with 95% t intervals."""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path
from typing import Callable

# two-sided 95% quantiles of Student's t by degrees of freedom (seeds - 1)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131}
MAX_SEEDS = max(T975) + 1


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def paired(a: list[float], b: list[float]) -> tuple[float, float, bool]:
    """(mean of a - b, half-width of its 95% t interval, whether the interval excludes 0)."""
    d = [x - y for x, y in zip(a, b)]
    if len(d) < 2:
        return statistics.mean(d), math.nan, False
    half = T975[len(d) - 1] * statistics.stdev(d) / math.sqrt(len(d))
    return statistics.mean(d), half, abs(statistics.mean(d)) > half


def summary(values: list[float], digits: int) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def load(results_dir: Path, steps: int) -> dict:
    """Every stored seed of ``steps`` steps: {"steps", "seeds", "runs": {row: [per seed]}},
    keeping the rows every seed has (so each difference pairs the same seeds)."""
    by_seed: dict = {}
    for path in sorted(results_dir.glob("seed_*.json")):
        stored = json.loads(path.read_text())
        if stored["steps"] == steps:
            by_seed.setdefault(stored["seed"], {}).update(stored["runs"])
    seeds = sorted(by_seed)
    names = dict.fromkeys(n for runs in by_seed.values() for n in runs)  # first-run order
    runs = {n: [by_seed[s][n] for s in seeds] for n in names if all(n in by_seed[s] for s in seeds)}
    return {"steps": steps, "seeds": seeds, "runs": runs}


def tables(row: str, runs: dict, metrics: dict[str, str], digits: dict[str, int],
           bases: tuple[str, ...], lead: tuple[str, Callable[[str, list], str]]) -> list[str]:
    """Markdown lines: one ``row`` per run name with mean ± sd of each metric (after the
    ``lead`` column: its header and a cell per row), then per base the paired differences."""
    header, cell = lead
    lines = [f"| {row} | {header} | " + " | ".join(metrics.values()) + " |",
             "|---|---|" + "---|" * len(metrics)]
    for name, rs in runs.items():
        lines.append(f"| {name} | {cell(name, rs)} | " + " | ".join(
            summary([r[m] for r in rs], digits[m]) for m in metrics) + " |")
    for base in bases:
        if base not in runs:
            continue
        lines += ["", f"paired difference against {base} (mean, 95% interval; * excludes 0)", "",
                  f"| {row} | " + " | ".join(metrics.values()) + " |",
                  "|---|" + "---|" * len(metrics)]
        for name, rs in runs.items():
            if name == base:
                continue
            cells = []
            for m in metrics:
                mean, half, separates = paired([r[m] for r in rs], [r[m] for r in runs[base]])
                mark = " *" if separates else ""
                cells.append(f"{mean:+.{digits[m]}f} ± {half:.{digits[m]}f}{mark}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines
