"""The cache job's writers as a waiting trainer and a second job see them: real heartbeats
(threads, and a process killed with SIGKILL), the claim files, the reader's clock.

A writer that beats but finishes no part is named stalled once its limit (derived from its
own slowest part) passes; one dead writer of two is named at once although the other runs;
a second job is refused while the first beats, and takes over once the first is silent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fbi.distill import claim
from fbi.distill.progress import DONE, FAILED, Heartbeat, Liveness
from fbi_testing import REPO

BEAT = 0.05


def until(check, limit_s: float, poll_s: float = 0.02):
    """(first non-None value of ``check()``, seconds it took); fails after ``limit_s``."""
    start = time.monotonic()
    while time.monotonic() - start < limit_s:
        value = check()
        if value is not None:
            return value, time.monotonic() - start
        time.sleep(poll_s)
    raise AssertionError(f"nothing after {limit_s} s")


def test_a_writer_that_beats_but_finishes_no_part_is_named_stalled(tmp_path):
    claim.acquire(tmp_path, "job", 2, "python -m fbi.distill.cache_writer x=1", 1.0)
    stuck = Heartbeat(tmp_path, "stuck", BEAT, "cmd", 0, None, "job", 2)
    steady = Heartbeat(tmp_path, "steady", BEAT, "cmd", 1, None, "job", 2)
    try:
        for hb, part in ((stuck, 0), (steady, 1)):
            hb.starting(part)
        time.sleep(0.1)
        for hb, part in ((stuck, 2), (steady, 3)):
            hb.finished()  # slowest part so far: about 0.1 s
            hb.starting(part)
        liveness = Liveness(tmp_path, dead_after_s=2.0, wait_s=30, stall_parts=10)
        liveness.reset()
        limit = max(10 * stuck.record["part_s"], 2.0)

        def check():
            steady.finished()  # the other writer keeps its pace
            steady.starting(steady.record["part"] + 2)
            return liveness.gone()

        message, took = until(check, 10 * limit)
        assert limit <= took < limit + 2.0
        assert "writer" in message and f"pid {os.getpid()} (rank 0 of 2, at part 2) is stalled" \
            in message and "no part finished for" in message and "(rank 1" not in message
        assert message.endswith("python -m fbi.distill.cache_writer x=1")
    finally:
        stuck.stop(DONE)
        steady.stop(DONE)


def beating_process(directory: Path, rank: int, job: str) -> subprocess.Popen:
    code = ("import sys, time; from pathlib import Path; "
            "from fbi.distill.progress import Heartbeat; "
            f"h = Heartbeat(Path(sys.argv[1]), 'proc', {BEAT}, 'cmd', {rank}, None, '{job}', 2); "
            "h.starting(4); print('up', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(directory)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "up\n"
    return proc


def test_one_dead_writer_of_two_is_named_while_the_other_still_runs(tmp_path):
    claim.acquire(tmp_path, "job", 2, "cmd", 1.0)
    live = Heartbeat(tmp_path, "live", BEAT, "cmd", 0, None, "job", 2)
    killed = beating_process(tmp_path, 1, "job")
    try:
        liveness = Liveness(tmp_path, dead_after_s=1.5, wait_s=30, stall_parts=10)
        assert liveness.gone() is None
        liveness.reset()
        reset = time.monotonic()
        killed.kill()  # SIGKILL: it records nothing
        killed.wait()
        message, _ = until(liveness.gone, 10)
        assert 1.5 <= time.monotonic() - reset < 6.5  # named at once, not after the live one ends
        assert f"pid {killed.pid} (rank 1 of 2, at part 4) is gone (silent for 1.5 s)" in message
        assert live.record["state"] == "running"
        failed = Heartbeat(tmp_path, "failed", BEAT, "cmd", 1, None, "job", 2)
        failed.stop(FAILED)  # a writer that recorded its failure: named on the next look
        assert "(rank 1 of 2) failed" in Liveness(tmp_path, 1.5, 30, 10).gone()
    finally:
        live.stop(DONE)
        killed.kill()


def test_writers_of_an_older_job_do_not_count(tmp_path):
    claim.acquire(tmp_path, "old", 1, "cmd", 1.0)
    Heartbeat(tmp_path, "old", BEAT, "cmd", 0, None, "old", 1).stop(FAILED)
    claim.acquire(tmp_path, "new", 1, "cmd", 1.0)
    new = Heartbeat(tmp_path, "new", BEAT, "cmd", 0, None, "new", 1)
    try:
        assert Liveness(tmp_path, 0.5, 30, 10).gone() is None
    finally:
        new.stop(DONE)


def test_a_second_job_is_refused_while_the_first_beats_and_replaces_a_silent_one(tmp_path):
    assert claim.acquire(tmp_path, "first", 2, "first command", 1.0) == 0
    first = beating_process(tmp_path, 0, "first")
    try:
        with pytest.raises(claim.ClaimRefused, match=rf"another cache job \(writer \S+ pid "
                                                     rf"{first.pid}, rank 0, started with: "
                                                     r"first command\)"):
            claim.acquire(tmp_path, "second", 1, "cmd", 1.0)
        assert claim.held(tmp_path, 0)
        first.kill()
        first.wait()
        start = time.monotonic()
        assert claim.acquire(tmp_path, "second", 1, "cmd", 1.0) == 1
        assert 1.0 <= time.monotonic() - start < 6.0  # it watched the silent job first
        assert not claim.held(tmp_path, 0) and claim.held(tmp_path, 1)
        assert claim.current(tmp_path) == (1, {"job": "second", "world_size": 1,
                                               "command": "cmd"})
    finally:
        first.kill()


def test_a_job_whose_writers_all_stopped_is_replaced_at_once(tmp_path):
    claim.acquire(tmp_path, "first", 1, "cmd", 1.0)
    Heartbeat(tmp_path, "w", BEAT, "cmd", 0, None, "first", 1).stop(DONE)
    start = time.monotonic()
    assert claim.acquire(tmp_path, "second", 1, "cmd", 60.0) == 1
    assert time.monotonic() - start < 10.0  # far below the 60 s it would watch a live job
