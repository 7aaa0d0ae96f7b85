"""One cache job writes a cache at a time: its claim.

    claims/<generation>.json   {"job", "world_size", "command"}: the newest generation holds
                               the cache; rank r of its ``world_size`` writes parts r, r + w, ...

A job takes the next generation with a hard link (it fails when the name exists), so of two jobs starting at once
one gets it and the other is refused. A job whose claim is newest while one of its writers
(fbi/distill/progress.py heartbeats) still beats refuses a new one, naming it; a job whose
writers all stopped, or fell silent for ``dead_after_s``, is replaced. A writer checks
``held`` before each part, so one that was judged dead (frozen, then thawed) stops instead
of writing beside the job that replaced it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from fbi.atomic import write_json
from fbi.config import ConfigError

log = logging.getLogger(__name__)

CLAIMS = "claims"
RUNNING = "running"


class ClaimRefused(ConfigError):
    """Another cache job holds the cache."""


def current(directory: Path) -> tuple[int, dict] | None:
    """(generation, claim) of the job holding ``directory``, or None before the first."""
    folder = directory / CLAIMS
    generations = sorted(int(p.stem) for p in folder.glob("*.json")) if folder.is_dir() else []
    if not generations:
        return None
    return generations[-1], json.loads((folder / f"{generations[-1]:08d}.json").read_text())


def writers(directory: Path, job: str) -> dict[str, dict]:
    """The heartbeat records of ``job``'s writers, by name."""
    records = {}
    folder = directory / "writers"
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):  # replaced between glob and read
            continue
        if record.get("job") == job:
            records[path.stem] = record
    return records


def _alive(directory: Path, job: str, dead_after_s: float, poll_s: float) -> dict | None:
    """A writer of ``job`` that beats within ``dead_after_s`` (watched on this clock), or None.
    A job with no writer on record yet may be starting: it gets the same time to show one."""
    records = writers(directory, job)
    if records and all(r["state"] != RUNNING for r in records.values()):
        return None  # every writer stopped and said so
    first = {n: r["beat"] for n, r in records.items()}
    log.info("%s: watching the heartbeats of the job holding it (%s) for up to %.0f s before "
             "taking over", directory, job, dead_after_s)
    deadline = time.monotonic() + dead_after_s
    while time.monotonic() < deadline:
        for name, record in writers(directory, job).items():
            if record["state"] == RUNNING and record["beat"] != first.get(name):
                return record
        time.sleep(poll_s)
    return None


def acquire(directory: Path, job: str, world_size: int, command: str, dead_after_s: float,
            poll_s: float = 0.2) -> int:
    """Claim ``directory`` for ``job`` (rank 0, before any part is written); returns the
    generation. Waits up to ``dead_after_s`` to tell a silent previous job from a live one."""
    held = current(directory)
    if held is not None:
        alive = _alive(directory, held[1]["job"], dead_after_s, poll_s)
        if alive is not None:
            raise ClaimRefused(
                f"teacher.cache.dir: {directory} is being written by another cache job (writer "
                f"{alive['host']} pid {alive['pid']}, rank {alive['rank']}, started with: "
                f"{held[1]['command']}); two jobs would write the same parts. Wait for it, or "
                "stop it first")
    generation = 0 if held is None else held[0] + 1
    (directory / CLAIMS).mkdir(exist_ok=True)
    path = directory / CLAIMS / f"{generation:08d}.json"
    tmp = path.with_name(f".{job}.tmp")
    write_json(tmp, {"job": job, "world_size": world_size, "command": command})
    try:  # link, unlike rename, fails when the name exists: whole and exclusive at once
        os.link(tmp, path)
    except FileExistsError:
        raise ClaimRefused(f"teacher.cache.dir: {directory} was claimed by another cache job "
                           f"that started at the same time ({path}); run one job") from None
    finally:
        tmp.unlink()
    return generation


def held(directory: Path, generation: int) -> bool:
    """Whether no later job has claimed ``directory`` since ``generation``."""
    return not (directory / CLAIMS / f"{generation + 1:08d}.json").exists()
