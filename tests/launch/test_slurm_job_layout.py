"""What each node's task of launch/slurm/train.sbatch gets from a real SLURM cluster whose
tasks are bound to their CPUs (TaskPlugin=task/affinity, srun --exact as sites set it with
SLURM_EXACT): the CPUs of --cpus-per-task, as many OpenMP threads, and the experiment's own
run directory. The node's torchrun is replaced by a probe (``PYTHON``) that records what it
was started with: the layout is the question here, training is tested in test_slurm.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cluster import SlurmCluster, why_not_slurm
from fbi_testing import REPO

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

PROBE = """#!/bin/bash
exec python3 -c 'import json, os, sys
print(json.dumps({"cpus": len(os.sched_getaffinity(0)), "omp": os.environ["OMP_NUM_THREADS"],
                  "args": sys.argv[1:]}))' "$@" > "$PROBE_DIR/node$SLURM_NODEID.json"
"""


@pytest.fixture(scope="module")
def bound_slurm(tmp_path_factory):
    reason = why_not_slurm()
    if reason:
        pytest.skip(reason)
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs 2 CPUs to tell one CPU per task from --cpus-per-task=2")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), task_plugin="task/affinity")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def test_each_task_gets_its_cpus_and_the_experiments_run_dir(bound_slurm, tmp_path):
    probe = tmp_path / "probe.sh"
    probe.write_text(PROBE)
    probe.chmod(0o755)
    env = {"PYTHON": str(probe), "PROBE_DIR": str(tmp_path), "SLURM_EXACT": "1",
           "OMP_NUM_THREADS": ""}
    job = bound_slurm.sbatch(
        "--partition=debug", "--gpus-per-node=0", "--cpus-per-task=2", "--time=5",
        f"--output={tmp_path}/%j.out", str(REPO / "launch" / "slurm" / "train.sbatch"),
        "experiment=fbi_130m", cwd=REPO, env=env)
    info = bound_slurm.wait(job, timeout=120)
    text = (tmp_path / f"{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", text + bound_slurm.logs()
    for node in (0, 1):
        seen = json.loads((tmp_path / f"node{node}.json").read_text())
        # Before the fix srun took one CPU per task (it ignores sbatch's -c since 22.05):
        # 1 CPU under 2 OpenMP threads.
        assert seen["cpus"] == 2 and seen["omp"] == "2", seen
        # No run_dir override: the config's, which names the experiment (was runs/fbi for
        # every job, whatever its experiment).
        assert not any(a.startswith("run_dir=") for a in seen["args"]), seen["args"]
        assert seen["args"][-2:] == ["resume=auto", "experiment=fbi_130m"]
    assert "run dir from the config" in text
