"""A trainer following a cache job that dies, or that it is told to leave: a writer killed
with SIGKILL stops the trainer (non-zero, a checkpoint, the command that restarts the job);
SIGTERM while waiting checkpoints and exits as preemption does. Real processes: train.py and
the cache writer, the writer frozen with SIGSTOP at a part boundary it has passed, then killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fbi_testing import REPO

pytestmark = pytest.mark.slow

WRITER = REPO / "fbi" / "distill" / "cache_writer.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def base(tiny_run) -> list[str]:
    return tiny_run + ["teacher=cache", "teacher.cache.k=8", "teacher.cache.part_samples=8",
                       "max_steps=1000", "optim.decay_steps=1000", "checkpoint_every=1000",
                       "teacher.cache.heartbeat_s=0.5"]


def start(script: Path, args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(script), *args], cwd=REPO, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def read_until(proc: subprocess.Popen, text: str, seen: list[str]) -> None:
    for line in proc.stdout:
        seen.append(line)
        if text in line:
            return
    raise AssertionError("".join(seen)[-4000:])


@pytest.fixture(scope="module")
def frozen_writer(base, tmp_path_factory):
    """A cache job stopped by SIGSTOP after it logged 2 parts of many: alive to the OS, silent
    to the trainer. Yields (cache dir, pid); killed at the end."""
    from fbi.distill.cache import load_manifest, num_parts
    from fbi.distill.progress import Progress

    directory = tmp_path_factory.mktemp("liveness") / "cache"
    writer = start(WRITER, base + [f"teacher.cache.dir={directory}"])
    deadline = time.monotonic() + 300
    while True:
        assert writer.poll() is None and time.monotonic() < deadline, writer.stdout.read()
        logs = list((directory / "progress").glob("*.log")) if directory.exists() else []
        if logs and logs[0].stat().st_size >= 16:  # two 8-byte records
            os.kill(writer.pid, signal.SIGSTOP)
            break
        time.sleep(0.005)
    progress = Progress(directory, num_parts(load_manifest(directory)))
    progress.refresh()
    assert not progress.complete(), "the job finished before it could be frozen"
    yield directory, writer
    writer.kill()
    writer.communicate()


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.parent.name for p in (run_dir / "checkpoints").glob("step_*/complete.json"))


def test_sigterm_while_waiting_for_the_cache_checkpoints_and_exits(base, frozen_writer, tmp_path):
    directory, _ = frozen_writer
    trainer = start(REPO / "train.py", base + [f"teacher.cache.dir={directory}",
                                               f"run_dir={tmp_path / 'run'}"])
    seen: list[str] = []
    read_until(trainer, "waiting for part", seen)  # the writer is silent, not yet judged dead
    trainer.send_signal(signal.SIGTERM)
    log = "".join(seen) + trainer.communicate(timeout=120)[0]
    assert trainer.returncode == 0, log[-4000:]
    step = int(log.split("stopped after step ")[1].split()[0])
    assert "on SIGTERM" in log and step >= 2
    assert checkpoints(tmp_path / "run") == [f"step_{step:08d}"]


def test_a_killed_writer_stops_the_trainer_with_a_checkpoint_and_the_restart_command(
        base, frozen_writer, tmp_path):
    directory, writer = frozen_writer
    writer.kill()  # SIGKILL: no chance to record why it stopped
    writer.wait()
    trainer = start(REPO / "train.py", base + [f"teacher.cache.dir={directory}",
                                               f"run_dir={tmp_path / 'run'}",
                                               "teacher.cache.dead_after_s=3"])
    log = trainer.communicate(timeout=300)[0]
    assert trainer.returncode == 3, log[-4000:]
    assert "(rank 0 of 1, at part " in log and ") is gone (silent for 3 s)" in log
    command = log.split("(it writes only the missing parts): ")[1].split(" (after step")[0]
    assert command.startswith("python -m fbi.distill.cache_writer ")
    assert f"teacher.cache.dir={directory}" in command
    step = int(log.split("(after step ")[1].split(",")[0])
    assert step >= 2 and checkpoints(tmp_path / "run") == [f"step_{step:08d}"]
