"""Progress of long work outside the training loop (evaluation, export): a bar on an
interactive terminal, otherwise a log line every ``every`` seconds with the rate and the time
left, as training's own step lines. Rank 0 only: the caller passes ``enabled``."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("fbi.progress")


class Progress:
    def __init__(self, what: str, total: int, unit: str = "items", every: float = 30.0,
                 enabled: bool = True) -> None:
        self.what, self.total, self.unit, self.every = what, total, unit, every
        self.enabled, self.done = enabled, 0
        self.start = self.last = time.perf_counter()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=what, unit=unit, file=sys.stderr)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if self.enabled and (now - self.last >= self.every or self.done >= self.total):
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            log.info("%s: %d/%d %s (%.0f%%), %.2f %s/s, %.0f s left", self.what, self.done,
                     self.total, self.unit, 100 * self.done / max(self.total, 1), rate, self.unit,
                     (self.total - self.done) / rate if rate else float("inf"))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
