"""One run per run directory: rank 0 holds an exclusive ``flock`` on ``<run_dir>/.lock``.

The kernel drops the lock when its process ends, however it ends (kill -9, node crash on a
local disk, a lost NFS client's lease), so a crashed run never leaves the directory locked;
the file's content (pid, host, start time) only explains a refusal.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

from fbi.config import ConfigError

LOCK = ".lock"


class RunDirBusy(ConfigError):
    """Another live process trains in this run directory."""


class RunLock:
    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.created_dir = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
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
        self._file.seek(0)
        self._file.truncate()
        self._file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                     "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        self._file.flush()

    def release(self, refused: bool = False) -> None:
        """``refused``: the run stopped before doing anything; a run directory this lock
        created and that holds nothing else is removed again."""
        self._file.close()
        if refused and self.created_dir and [p.name for p in self.run_dir.iterdir()] == [LOCK]:
            shutil.rmtree(self.run_dir, ignore_errors=True)
