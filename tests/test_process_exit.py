"""fbi.process_exit, the way every entry point the suite starts as several processes ends:
output flushed and the interpreter's teardown skipped once the work is done; a failure never
hidden."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fbi_testing import REPO, run_ranks

# Buffered output, as a user's job has it: only run_and_exit's flush can save the last lines.
ENV = {**{k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"},
       "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_gloo_ranks_end_with_status_0_past_an_aborting_teardown():
    proc = run_ranks([str(REPO / "tests" / "exiting_ranks.py"), "done"], env=ENV, timeout=300)
    assert "[default0]:rank 0: sum 2" in proc.stdout and "[default1]:rank 1: sum 2" in proc.stdout


@pytest.mark.slow
@pytest.mark.multiprocess
def test_an_exception_in_one_rank_fails_the_job_and_its_traceback_is_shown():
    """The failure message names the status and shows the end of each rank's own output: rank 1's
    traceback (printed before its teardown aborts), rank 0's flushed print."""
    with pytest.raises(AssertionError) as failed:
        run_ranks([str(REPO / "tests" / "exiting_ranks.py"), "raise"], env=ENV, timeout=300)
    message = str(failed.value)
    assert "failed (1)" in message
    rank1 = message.split("--- rank 1 stderr.log")[1]
    assert "Traceback (most recent call last)" in rank1
    assert 'exiting_ranks.py", line' in rank1
    assert "ValueError: rank 1 fails after the collective" in rank1
    assert "rank 0: sum 2" in message.split("--- rank 0 stdout.log")[1]


def exits(body: str, abort_at_teardown: bool) -> subprocess.CompletedProcess:
    """``python -c`` of ``run_and_exit(main)`` with ``body`` as main's; an atexit handler that
    aborts stands in for DeepSpeed's threads (tests/exiting_ranks.py says why)."""
    script = ("import atexit, os, sys\nfrom fbi.process_exit import leave, run_and_exit\n"
              f"def main():\n    {body}\n"
              + ("atexit.register(os.abort)\n" if abort_at_teardown else "")
              + "run_and_exit(main)\n")
    return subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("body,status", [("pass", 0), ("leave(3)", 3)])
def test_return_and_leave_skip_an_aborting_teardown_and_flush_stdout(body, status):
    proc = exits(f"sys.stdout.write('done'); {body}", abort_at_teardown=True)
    assert (proc.returncode, proc.stdout) == (status, "done"), proc.stderr


@pytest.mark.parametrize("body,status,stderr", [
    ("raise SystemExit(3)", 3, ""),
    ("raise SystemExit('no shards under data/')", 1, "no shards under data/\n"),
    ("raise ValueError('bad batch')", 1, "ValueError: bad batch\n"),
], ids=["exit-3", "exit-message", "exception"])
def test_a_failure_ends_as_without_run_and_exit(body, status, stderr):
    """The interpreter's own status and message: run_and_exit hides no failure."""
    proc = exits(body, abort_at_teardown=False)
    assert (proc.returncode, proc.stdout) == (status, "")
    assert proc.stderr.endswith(stderr)


def test_a_failure_reaches_an_in_process_caller():
    """runpy and tests run entry points in-process (tests/docs_parse.py parses each
    documented command's arguments by stopping its parser with an exception)."""
    from fbi.process_exit import run_and_exit

    def main():
        raise LookupError("stopped by the caller")

    with pytest.raises(LookupError, match="stopped by the caller"):
        run_and_exit(main)
