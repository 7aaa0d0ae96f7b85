"""fbi.process_exit, the way every entry point the suite starts as several processes ends:
output flushed, the interpreter's teardown skipped, the exit status kept."""

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
    traceback, rank 0's flushed print."""
    with pytest.raises(AssertionError) as failed:
        run_ranks([str(REPO / "tests" / "exiting_ranks.py"), "raise"], env=ENV, timeout=300)
    message = str(failed.value)
    assert "failed (1)" in message
    rank1 = message.split("--- rank 1 stderr.log")[1]
    assert "Traceback (most recent call last)" in rank1
    assert 'exiting_ranks.py", line' in rank1
    assert "ValueError: rank 1 fails after the collective" in rank1
    assert "rank 0: sum 2" in message.split("--- rank 0 stdout.log")[1]


@pytest.mark.parametrize("body,status,stderr", [
    ("print('done', end='')", 0, ""),
    ("raise SystemExit(3)", 3, ""),
    ("raise SystemExit('no shards under data/')", 1, "no shards under data/\n"),
    ("raise KeyboardInterrupt", 130, "KeyboardInterrupt\n"),
    ("raise ValueError('bad batch')", 1, "ValueError: bad batch\n"),
], ids=["return", "exit-3", "exit-message", "ctrl-c", "exception"])
def test_the_exit_status_is_the_interpreters(body, status, stderr):
    """What ``python script.py`` would exit with, the teardown's abort (atexit) skipped."""
    script = ("import atexit, os\nfrom fbi.process_exit import run_and_exit\n"
              f"def main():\n    {body}\natexit.register(os.abort)\nrun_and_exit(main)\n")
    proc = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == status, proc.stderr
    assert proc.stderr.endswith(stderr)
    assert proc.stdout == ("done" if status == 0 else "")
