"""The run directory's lock where the filesystem has no flock (Lustre without ``flock``, NFS
with ``nolock``): such a filesystem cannot be mounted on this machine, so ``fcntl.flock``
is made to fail as it does there (ENOLCK); everything else is real (files, processes)."""

from __future__ import annotations

import errno
import fcntl
import json
import socket
import subprocess
import sys

import pytest

from fbi.run_lock import HELD, LOCK, RunDirBusy, RunLock


@pytest.fixture
def no_flock(monkeypatch):
    def flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", flock)


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


def test_without_flock_a_lock_file_excludes_a_second_run_until_the_first_ends(
        tmp_path, no_flock, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    run = tmp_path / "run"
    first = RunLock(run)
    holder = json.loads((run / HELD).read_text())
    assert holder["host"] == socket.gethostname() and holder["pid"] > 0
    with pytest.raises(RunDirBusy, match=rf"in use by another run .*delete the file once it "
                                         rf"is known dead"):
        RunLock(run)
    first.release()
    assert not (run / HELD).exists()
    RunLock(run).release(refused=False)
    refused = RunLock(tmp_path / "fresh")
    refused.release(refused=True)
    assert not (tmp_path / "fresh").exists()


def test_a_lock_file_of_a_dead_run_is_taken_over_and_another_hosts_is_refused(
        tmp_path, no_flock, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    (tmp_path / HELD).write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname()}))
    lock = RunLock(tmp_path)
    assert json.loads((tmp_path / HELD).read_text())["pid"] != dead_pid()
    lock.release()
    # Another host's run cannot be checked from here: refused, naming the file.
    (tmp_path / HELD).write_text(json.dumps({"pid": 1, "host": "gpu17", "job": "41"}))
    with pytest.raises(RunDirBusy, match=rf"gpu17.*{HELD}"):
        RunLock(tmp_path)
    # ... unless it was an earlier incarnation of this job (requeued after a node failure).
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    RunLock(tmp_path).release()
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK]


def test_other_flock_errors_are_not_hidden(tmp_path, monkeypatch):
    def flock(fd, op):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(fcntl, "flock", flock)
    with pytest.raises(OSError, match="Bad file descriptor"):
        RunLock(tmp_path)
