"""What the cache job has written, and whether it is still alive, in a handful of files.

    progress/<writer>.log    one per writer process: the numbers of the parts it finished,
                             int64 little-endian, appended after the part's rows are flushed
    writers/<writer>.json    one per writer process: its heartbeat (rewritten atomically every
                             ``teacher.cache.heartbeat_s``) and, at the end, why it stopped

``<writer>`` is ``<host>-<pid>``: a process appends to its own log only, so no two processes
ever write one file and a record is never torn by another writer; a record cut off by a kill
is the last of its log and is ignored. The number of files grows with the number of writer
processes started, not with the number of parts (format 1 wrote one marker file per part:
about 38M files for one pass over Amber with parts of 16 samples).

Liveness is judged on the reader's clock, so clocks of different hosts never compare: a
writer is dead when its heartbeat has not changed for ``dead_after_s`` while the reader
watched, stalled when it beats but its count of finished parts does not move (``Liveness``).
Only the writers of the job holding the cache count (fbi/distill/claim.py).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from fbi.atomic import write_json
from fbi.distill import claim

log = logging.getLogger(__name__)

RECORD = np.dtype("<i8")
RUNNING, DONE, MAX_PARTS, FAILED = claim.RUNNING, "done", "max_parts", "failed"
MISSING_CHUNK = 2**16  # parts examined at once by ``missing_every``


def writer_name() -> str:
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())
    return f"{host}-{os.getpid()}"


class ProgressLog:
    """A writer's own append-only record of the parts it finished."""

    def __init__(self, directory: Path, name: str) -> None:
        (directory / "progress").mkdir(exist_ok=True)
        self._fd = os.open(directory / "progress" / f"{name}.log",
                           os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def append(self, part: int) -> None:
        os.write(self._fd, np.array([part], RECORD).tobytes())
        os.fsync(self._fd)  # the record outlives a crash of the node, as the rows do

    def close(self) -> None:
        os.close(self._fd)


class Progress:
    """The parts written so far, read incrementally from every writer's log (one bit per
    part: 4.8 MB for the 38M parts of one pass over Amber)."""

    def __init__(self, directory: Path, num_parts: int) -> None:
        self.directory, self.num_parts = directory / "progress", num_parts
        self._bits = np.zeros(-(-num_parts // 8), np.uint8)
        self._offsets: dict[str, int] = {}

    def refresh(self) -> None:
        if not self.directory.is_dir():
            return
        for path in sorted(self.directory.glob("*.log")):
            start = self._offsets.get(path.name, 0)
            with open(path, "rb") as f:
                f.seek(start)
                data = f.read()
            whole = len(data) - len(data) % RECORD.itemsize  # a record cut off by a kill
            parts = np.frombuffer(data[:whole], RECORD)
            if parts.size and (parts.min() < 0 or parts.max() >= self.num_parts):
                raise ValueError(f"{path}: part numbers outside [0, {self.num_parts}); the "
                                 "progress log belongs to another cache or is damaged")
            np.bitwise_or.at(self._bits, parts // 8, (1 << (parts % 8)).astype(np.uint8))
            self._offsets[path.name] = start + whole

    def has(self, part: int) -> bool:
        return bool(self._bits[part // 8] >> (part % 8) & 1)

    def missing(self, parts) -> list[int]:
        return [p for p in parts if not self.has(p)]

    def missing_every(self, start: int, step: int) -> Iterator[int]:
        """The missing parts among start, start + step, ... in order, generated a chunk at a
        time (a list of Amber's 38M parts would take 1.5 GB)."""
        span = step * MISSING_CHUNK
        for a in range(start, self.num_parts, span):
            parts = np.arange(a, min(a + span, self.num_parts), step, dtype=np.int64)
            written = (self._bits[parts // 8] >> (parts % 8).astype(np.uint8)) & 1
            yield from parts[written == 0].tolist()

    def writer_of(self, part: int) -> str | None:
        """The writer whose log holds ``part`` (a scan of the logs: for error messages)."""
        for path in sorted(self.directory.glob("*.log")) if self.directory.is_dir() else []:
            data = path.read_bytes()
            if (np.frombuffer(data[:len(data) - len(data) % RECORD.itemsize], RECORD)
                    == part).any():
                return path.stem
        return None

    def complete(self) -> bool:
        return int(np.unpackbits(self._bits, count=self.num_parts).sum()) == self.num_parts


class Heartbeat:
    """A writer's ``writers/<name>.json``: a beat every ``period_s`` from a daemon thread (it
    dies with the process, whatever kills it), what the writer is doing (the part it works
    on, how many it finished, its slowest part so far), and why it stopped, written by
    ``stop``. A beat says the process lives; ``parts`` says it makes progress."""

    def __init__(self, directory: Path, name: str, period_s: float, command: str, rank: int,
                 max_parts: int | None, job: str = "", world_size: int = 1) -> None:
        (directory / "writers").mkdir(exist_ok=True)
        self.path = directory / "writers" / f"{name}.json"
        self.record = {"state": RUNNING, "beat": 0, "rank": rank, "pid": os.getpid(),
                       "host": socket.gethostname(), "command": command, "parts": 0,
                       "max_parts": max_parts, "job": job, "world_size": world_size,
                       "part": None, "part_s": None}
        self._lock, self._stopped = threading.Lock(), threading.Event()
        self._started = time.monotonic()
        self._write()
        self._thread = threading.Thread(target=self._run, args=(period_s,), daemon=True)
        self._thread.start()

    def _write(self) -> None:
        with self._lock:
            self.record["beat"] += 1
            self.record["time"] = time.time()  # for people reading the file; never compared
            write_json(self.path, self.record)

    def _run(self, period_s: float) -> None:
        while not self._stopped.wait(period_s):
            self._write()

    def starting(self, part: int) -> None:
        self.record["part"] = part
        self._started = time.monotonic()
        self._write()

    def finished(self) -> None:
        """The current part is in the progress log (its time counts toward ``part_s``)."""
        took = time.monotonic() - self._started
        self.record["parts"] += 1
        self.record["part_s"] = max(took, self.record["part_s"] or 0.0)
        self._write()  # progress is seen at once, not a beat later

    def stop(self, state: str) -> None:
        self._stopped.set()
        self._thread.join()
        self.record["state"] = state
        self._write()


class Liveness:
    """The reader's view of the writers of the job holding the cache (fbi/distill/claim.py):
    ``gone()`` says why the parts cannot come, or None while they may.

    On the reader's clock (hosts' clocks never compare): a writer is dead when it stopped
    with ``failed`` or its beat has not changed for ``dead_after_s``; stalled when it beats
    but has finished no part for ``stall_parts`` times its slowest part so far (at least
    ``dead_after_s``; before its first part, ``wait_s``: loading a teacher takes minutes).
    One dead or stalled writer is enough: its parts will not come, whatever the others do."""

    def __init__(self, directory: Path, dead_after_s: float, wait_s: float,
                 stall_parts: float) -> None:
        self.directory = directory
        self.dead_after_s, self.wait_s, self.stall_parts = dead_after_s, wait_s, stall_parts
        # name -> (beat, when it changed, parts, when they changed)
        self._seen: dict[str, tuple[int, float, int, float]] = {}
        self._since = time.monotonic()

    def reset(self) -> None:
        """A new wait begins: writers seen before count from now."""
        self._since = now = time.monotonic()
        self._seen = {n: (beat, now, parts, now) for n, (beat, _, parts, _) in self._seen.items()}

    def _watch(self, records: dict[str, dict], now: float) -> None:
        for name, rec in records.items():
            beat, beat_t, parts, parts_t = self._seen.get(name, (None, now, None, now))
            self._seen[name] = (rec["beat"], now if rec["beat"] != beat else beat_t,
                                rec["parts"], now if rec["parts"] != parts else parts_t)

    def _stall_limit(self, rec: dict) -> float:
        if rec.get("part_s") is None:
            return max(self.wait_s, self.dead_after_s)
        return max(self.stall_parts * rec["part_s"], self.dead_after_s)

    def _trouble(self, name: str, rec: dict, now: float) -> str | None:
        _, beat_t, _, parts_t = self._seen[name]
        who = (f"writer {rec['host']} pid {rec['pid']} (rank {rec['rank']} of "
               f"{rec['world_size']}"
               + (f", at part {rec['part']})" if rec.get("part") is not None else ")"))
        if rec["state"] == FAILED:
            return f"{who} failed"
        if rec["state"] != RUNNING:
            return None
        if now - beat_t >= self.dead_after_s:
            return f"{who} is gone (silent for {self.dead_after_s:g} s)"
        limit = self._stall_limit(rec)
        if now - parts_t >= limit:
            slowest = ("no part finished yet" if rec.get("part_s") is None else
                       f"its slowest part took {rec['part_s']:.1f} s")
            return (f"{who} is stalled: alive, but no part finished for {limit:.0f} s "
                    f"({slowest}; teacher.cache.stall_parts={self.stall_parts:g})")
        return None

    def gone(self) -> str | None:
        now = time.monotonic()
        held = claim.current(self.directory)
        records = {} if held is None else claim.writers(self.directory, held[1]["job"])
        if not records:
            if now - self._since < self.wait_s:
                return None
            return (f"no cache job has started in {self.wait_s:.0f} s (no writer in "
                    f"{self.directory / 'writers'}); start it: python -m "
                    "fbi.distill.cache_writer with this run's overrides (or raise "
                    "teacher.cache.wait_s)")
        self._watch(records, now)
        command = held[1]["command"]
        troubles = [t for n, r in sorted(records.items()) if (t := self._trouble(n, r, now))]
        if troubles:
            return (f"the cache job's {'; '.join(troubles)}; stop the job if it still runs and "
                    f"restart it (it writes only the missing parts): {command}")
        if any(r["state"] == RUNNING for r in records.values()):
            return None
        if any(r["state"] == MAX_PARTS for r in records.values()):
            max_parts = next(r["max_parts"] for r in records.values())
            return (f"the cache job stopped on purpose after teacher.cache.max_parts="
                    f"{max_parts} parts per rank; resume it (it writes only the missing "
                    f"parts): {command}")
        return (f"the cache job's writers finished without writing every part; restart it "
                f"(it writes only the missing parts): {command}")
