"""One run per run directory: rank 0 holds an exclusive ``flock`` on ``<run_dir>/.lock``.

The kernel drops the lock when its process ends, however it ends (kill -9, node crash on a
local disk, a lost NFS client's lease), so a crashed run never leaves the directory locked;
the file's content (pid, host, job, start time) only explains a refusal.

Filesystems without ``flock`` (Lustre mounted without ``flock``, NFS with ``nolock`` where
the call fails) get a lock file instead: ``<run_dir>/.lock.held``, created with
``O_CREAT|O_EXCL`` (atomic on NFSv3+ and Lustre) and removed when the run ends. A run
that dies leaves it behind; it is taken over when its holder is provably gone (a pid no
longer alive on this host, or an earlier incarnation of this same SLURM job, e.g. after a
requeue), and otherwise refused, naming the file to delete once that run is known dead.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

from fbi.config import ConfigError

log = logging.getLogger("fbi")

LOCK = ".lock"
HELD = ".lock.held"  # the lock file of filesystems without flock
# What flock raises where the filesystem does not implement it.
NO_FLOCK = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)


class RunDirBusy(ConfigError):
    """Another live process trains in this run directory."""


def _holder() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "job": os.environ.get("SLURM_JOB_ID"), "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _gone(holder: dict) -> bool:
    """Whether the run that wrote ``holder`` has provably ended."""
    if holder.get("job") and holder["job"] == os.environ.get("SLURM_JOB_ID") and (
            holder.get("host") != socket.gethostname() or not _alive(int(holder["pid"]))):
        return True  # an earlier incarnation of this job (SLURM runs a job id once at a time)
    return holder.get("host") == socket.gethostname() and not _alive(int(holder["pid"]))


class RunLock:
    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.created_dir = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        self._held: Path | None = None
        self._file = open(run_dir / LOCK, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "unknown process"
            self._file.close()
            raise RunDirBusy(
                f"run_dir: {run_dir} is in use by another run ({holder}); wait for it to end "
                "or stop it (the lock goes with its process), or choose another run_dir"
            ) from None
        except OSError as err:
            if err.errno not in NO_FLOCK:
                raise
            self._file.close()
            self._file = None
            log.warning("run_dir: %s does not support flock (%s); locking with the file %s "
                        "instead", run_dir, os.strerror(err.errno), run_dir / HELD)
            self._take_held(run_dir / HELD)
            return
        self._file.seek(0)
        self._file.truncate()
        self._file.write(json.dumps(_holder()))
        self._file.flush()

    def _take_held(self, path: Path) -> None:
        for _ in range(2):  # a stale file is removed once, then created anew
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                text = path.read_text().strip()
                try:
                    holder = json.loads(text)
                except ValueError:
                    holder = {}  # written half: its writer died between create and write
                if holder and not _gone(holder):
                    raise RunDirBusy(
                        f"run_dir: {self.run_dir} is in use by another run ({text}); this "
                        f"filesystem has no flock, so a run that died leaves {path} behind: "
                        "wait for that run to end, or delete the file once it is known dead, "
                        "or choose another run_dir"
                    ) from None
                log.warning("run_dir: taking over %s from a run that has ended (%s)",
                            path, text or "empty")
                path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(_holder()))
            self._held = path
            return
        raise RunDirBusy(f"run_dir: {self.run_dir}: another run took {path} at the same "
                         "moment; choose another run_dir")

    def release(self, refused: bool = False) -> None:
        """``refused``: the run stopped before doing anything; a run directory this lock
        created and that holds nothing else is removed again."""
        if self._file is not None:
            self._file.close()
        if self._held is not None:
            self._held.unlink(missing_ok=True)
        if refused and self.created_dir and [p.name for p in self.run_dir.iterdir()] == [LOCK]:
            shutil.rmtree(self.run_dir, ignore_errors=True)
