"""Two "nodes" with their own network namespace, address and hostname: launch/torchrun_hosts.sh
forms a c10d rendezvous across them and trains; a killed worker makes both nodes restart from
the last checkpoint (--max_restarts) and finish. The deepspeed hostfile route across them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster import Namespaces, node_names, steps_logged, why_not_netns
from fbi_testing import REPO

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

NODES = node_names()


@pytest.fixture(scope="module")
def nodes():
    reason = why_not_netns()
    if reason:
        pytest.skip(reason)
    with Namespaces(NODES) as ns:
        yield ns


def env(run_dir: Path, **extra: str) -> dict:
    return {**os.environ, "RUN_DIR": str(run_dir), "PYTHON": sys.executable,
            "RSH": str(REPO / "tests" / "launch" / "netns_shell.sh"), "RDZV_TIMEOUT": "60",
            "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **extra}


def worker_pids(namespace: str) -> list[int]:
    """Training processes (not torchrun itself) inside ``namespace``."""
    pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True,
                          text=True).stdout.split()
    found = []
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        if any(c.endswith(b"train.py") for c in cmd) and b"torch.distributed.run" not in cmd:
            found.append(int(pid))
    return found


def stop_group(proc: subprocess.Popen) -> None:
    """Stop a launcher started in its own session and every process under it."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()



def both_succeed(procs: list[subprocess.Popen]) -> list[str]:
    """The two nodes' outputs, once both exited 0 (their process groups stopped either way)."""
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            stop_group(p)
    assert [p.returncode for p in procs] == [0, 0], outs[0][-4000:] + outs[1][-4000:]
    return outs

def output(tmp_path: Path) -> str:
    return (tmp_path / "out.txt").read_text()


def test_torchrun_across_two_namespaces_survives_a_killed_worker(nodes, overrides, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(  # started from the first node, as a user would
        nodes.command(NODES[0], [str(REPO / "launch" / "torchrun_hosts.sh"), ",".join(NODES),
                                 *overrides, "max_steps=200", "checkpoint_every=40",
                                 "optim.decay_steps=200"]),
        cwd=tmp_path, env=env(run, MAX_RESTARTS="2", RDZV_PORT="29411"),
        stdout=(tmp_path / "out.txt").open("w"), stderr=subprocess.STDOUT,
        start_new_session=True,  # so that a failure can stop every process it started
    )
    try:
        deadline = time.monotonic() + 300
        while not any(s > 45 for s in steps_logged(run)):  # past the first checkpoint
            assert proc.poll() is None and time.monotonic() < deadline, output(tmp_path)[-5000:]
            time.sleep(0.05)
        victims = worker_pids(NODES[1])
        assert len(victims) == 1
        os.kill(victims[0], signal.SIGKILL)
        proc.wait(timeout=300)
    finally:
        stop_group(proc)
    out = output(tmp_path)
    assert proc.returncode == 0, out[-5000:]
    assert "world 2" in out
    assert "resumed from" in out and "step_00000040" in out  # both restarted from the checkpoint
    steps = steps_logged(run)
    assert steps[-1] == 200 and steps.count(41) == 2  # steps after 40 were trained again
    assert (run / "checkpoints" / "step_00000200" / "complete.json").exists()


def test_deepspeed_hostfile_across_two_namespaces(nodes, overrides, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{n} slots=1\n" for n in NODES))
    run = tmp_path / "run"
    procs = [
        subprocess.Popen(
            nodes.command(node, [str(REPO / "launch" / "deepspeed_hostfile.sh"), str(hostfile),
                                 *overrides, "max_steps=3", "zero=stage1"]),
            cwd=tmp_path, env=env(run, NODE_RANK=str(i), MASTER_PORT="29412"),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        for i, node in enumerate(NODES)
    ]
    outs = both_succeed(procs)
    assert "world 2" in outs[0] and "deepspeed launch" in outs[0]
    assert steps_logged(run) == [1, 2, 3]


def test_unresolvable_hostnames_join_through_local_addr(nodes, overrides, tmp_path):
    """Each node calls itself a name nobody resolves (as on clusters whose hostnames live in
    no DNS); launch/torchrun_node.sh with LOCAL_ADDR and the rendezvous at an address: the
    process group's store is announced at the address the rendezvous resolved, not at the
    host's FQDN, so both ranks join and train."""
    run = tmp_path / "run"
    procs = [
        subprocess.Popen(
            nodes.command(node, ["bash", str(REPO / "launch" / "torchrun_node.sh"), *overrides,
                                 f"run_dir={run}", "max_steps=2"], hostname=f"ghost{i}.invalid"),
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=env(run, NNODES="2", NODE_RANK=str(i), RDZV_ID="ghosts",
                    RDZV_ENDPOINT=f"{nodes.addrs[NODES[0]]}:29413",
                    LOCAL_ADDR=nodes.addrs[node]),
            start_new_session=True)
        for i, node in enumerate(NODES)
    ]
    outs = both_succeed(procs)
    assert f"via {nodes.addrs[NODES[0]]}" in outs[0] and "rank 0/2" in outs[0]
    assert steps_logged(run) == [1, 2]
