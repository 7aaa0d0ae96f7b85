"""launch/torchrun_hosts.sh and launch/deepspeed_hostfile.sh, around what they start: a Ctrl-C
reaches every host's torchrun, and a missing remote shell is named before anything starts.

The "remote" hosts are this machine reached through the script's own ``RSH`` hook (a shell
that starts the line with an empty environment, as ssh does), and each host's torchrun is a
probe (``PYTHON``) that records the TERM it receives: what matters here is the launcher."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fbi_testing import REPO

pytestmark = pytest.mark.multiprocess

FAKE_SSH = """#!/bin/bash
# RSH host 'command line': run it here, with no environment but PATH (ssh passes none).
shift
exec env -i PATH="$PATH" bash -c "$1"
"""
PROBE = """#!/bin/bash
trap 'echo term > {dir}/$NODE_RANK.term; exit 0' TERM
echo $$ > {dir}/$NODE_RANK.started
while :; do sleep 0.1; done
"""


def script(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def wait_for(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_ctrl_c_stops_the_runs_on_every_host(tmp_path):
    env = {**os.environ, "RSH": str(script(tmp_path / "rsh", FAKE_SSH)),
           "PYTHON": str(script(tmp_path / "probe", PROBE.format(dir=tmp_path))),
           "RUN_DIR": str(tmp_path / "run")}
    # As from a terminal: SIGINT not ignored. A test session started in the background
    # (nohup, `&`) ignores it and passes that on, and bash cannot trap a signal it was
    # started ignoring, so the launcher would never see the Ctrl-C.
    launcher = subprocess.Popen(
        ["bash", str(REPO / "launch" / "torchrun_hosts.sh"), "localhost,localhost",
         "max_steps=1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    started = [tmp_path / "0.started", tmp_path / "1.started"]
    try:
        wait_for(lambda: all(p.exists() and p.read_text().strip() for p in started), 60,
                 "the probes did not start")
        os.killpg(launcher.pid, signal.SIGINT)  # Ctrl-C: the terminal's whole process group
        out = launcher.communicate(timeout=60)[0]
        assert (tmp_path / "0.term").exists() and (tmp_path / "1.term").exists(), out
        assert "TERM to torchrun on localhost localhost" in out
    finally:
        for p in started:  # a probe that missed the TERM would run on
            if p.exists() and p.read_text().strip():
                try:
                    os.kill(int(p.read_text()), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()


def test_deepspeed_hostfile_names_the_missing_remote_shell(tmp_path):
    """Several hosts need pdsh or ssh (the launcher's runners); without either the script
    says what to install before the launcher starts. Simulated by a PATH without them."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("awk", "cat", "mktemp", "nproc", "rm", "dirname", "basename", "getent",
                 "env", "bash"):
        found = subprocess.run(["bash", "-c", f"command -v {tool}"], capture_output=True,
                               text=True).stdout.strip()
        (bin_dir / tool).symlink_to(found)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    proc = subprocess.run(
        [str(bin_dir / "bash"), str(REPO / "launch" / "deepspeed_hostfile.sh"), str(hostfile),
         "max_steps=1"], env={"PATH": str(bin_dir), "HOME": str(tmp_path)},
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "needs pdsh or ssh to reach 127.0.0.1" in proc.stderr
    assert "apt-get install pdsh openssh-client" in proc.stderr and "NODE_RANK" in proc.stderr
