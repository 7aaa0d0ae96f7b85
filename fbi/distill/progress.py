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

Liveness is judged on the reader's clock: a writer is gone when its heartbeat has not changed
for ``dead_after_s`` while the reader watched, so clocks of different hosts never compare.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import socket
import threading
import time
from pathlib import Path

import numpy as np

from fbi.atomic import write_json
from fbi.distill.teacher_checkpoint import hash_weights

log = logging.getLogger(__name__)

RECORD = np.dtype("<i8")
RUNNING, DONE, MAX_PARTS, FAILED = "running", "done", "max_parts", "failed"


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

    def complete(self) -> bool:
        return int(np.unpackbits(self._bits, count=self.num_parts).sum()) == self.num_parts


class Heartbeat:
    """A writer's ``writers/<name>.json``: a beat every ``period_s`` from a daemon thread (it
    dies with the process, whatever kills it) and the reason it stopped, written by ``stop``."""

    def __init__(self, directory: Path, name: str, period_s: float, command: str, rank: int,
                 max_parts: int | None) -> None:
        (directory / "writers").mkdir(exist_ok=True)
        self.path = directory / "writers" / f"{name}.json"
        self.record = {"state": RUNNING, "beat": 0, "rank": rank, "pid": os.getpid(),
                       "host": socket.gethostname(), "command": command, "parts": 0,
                       "max_parts": max_parts}
        self._lock, self._stopped = threading.Lock(), threading.Event()
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

    def wrote(self, parts: int) -> None:
        self.record["parts"] = parts

    def stop(self, state: str) -> None:
        self._stopped.set()
        self._thread.join()
        self.record["state"] = state
        self._write()


class Liveness:
    """The reader's view of the writers: ``gone()`` says why none is left to write, or None
    while one is alive (or none has been seen for less than ``dead_after_s``)."""

    def __init__(self, directory: Path, dead_after_s: float, wait_s: float) -> None:
        self.directory = directory / "writers"
        self.dead_after_s, self.wait_s = dead_after_s, wait_s
        self._seen: dict[str, tuple[int, float]] = {}  # name -> (beat, when it changed)
        self._since = time.monotonic()

    def reset(self) -> None:
        """A new wait begins: writers seen before count from now."""
        self._since = time.monotonic()
        self._seen = {name: (beat, self._since) for name, (beat, _) in self._seen.items()}

    def gone(self) -> str | None:
        now = time.monotonic()
        records = {}
        for path in sorted(self.directory.glob("*.json")) if self.directory.is_dir() else []:
            try:
                records[path.stem] = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):  # replaced between glob and read
                continue
        for name, rec in records.items():
            beat, changed = self._seen.get(name, (None, now))
            self._seen[name] = (rec["beat"], now if rec["beat"] != beat else changed)
        alive = [n for n, r in records.items()
                 if r["state"] == RUNNING and now - self._seen[n][1] < self.dead_after_s]
        if alive:
            return None
        if not records:
            if now - self._since < self.wait_s:
                return None
            return (f"no cache job has started in {self.wait_s:.0f} s (no writer in "
                    f"{self.directory}); start it: python -m fbi.distill.cache_writer "
                    "with this run's overrides (or raise teacher.cache.wait_s)")
        newest = max(records.values(), key=lambda r: r.get("time", 0))
        command = newest["command"]
        if any(r["state"] == MAX_PARTS for r in records.values()):
            return (f"the cache job stopped on purpose after teacher.cache.max_parts="
                    f"{newest['max_parts']} parts per rank; resume it (it writes only the "
                    f"missing parts): {command}")
        states = ", ".join(sorted({f"{r['state']} ({r['host']} pid {r['pid']})"
                                   if r["state"] != RUNNING else
                                   f"silent for {self.dead_after_s:.0f} s ({r['host']} pid "
                                   f"{r['pid']})" for r in records.values()}))
        return (f"the cache job's writers are gone ({states}); restart the cache job (it "
                f"writes only the missing parts): {command}")


def convert(directory: Path) -> int:
    """A format-1 cache (a marker file per part) to format 2: one progress log of its parts,
    and the full hash of the teacher at ``teacher_path`` (which the quick fingerprint of the
    format-1 manifest must still match)."""
    manifest_path = directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if manifest["format"] != 1:
        raise SystemExit(f"{directory} is format {manifest['format']}: nothing to convert")
    markers = sorted((directory / "parts").iterdir()) if (directory / "parts").is_dir() else []
    progress = ProgressLog(directory, "converted-from-markers")
    for m in markers:
        progress.append(int(m.name))
    progress.close()
    if "teacher_weights" not in manifest:  # format 1 hashed the ends of the files only
        manifest["teacher_weights"] = hash_weights(Path(manifest["teacher_path"]),
                                                   directory / "teacher_blocks")
    manifest["format"] = 2
    write_json(manifest_path, manifest)
    for m in markers:
        m.unlink()
    if markers:
        (directory / "parts").rmdir()
    return len(markers)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fbi.distill.progress",
        description="Convert a format-1 teacher cache (one marker file per part) to format 2.")
    parser.add_argument("convert", choices=["convert"])
    parser.add_argument("directory", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    log.info("converted %d part markers in %s", convert(args.directory), args.directory)


if __name__ == "__main__":
    main()
