"""launch/slurm/train.sbatch on a real SLURM cluster of two slurmd nodes on this machine:
2-node gloo training through torchrun's c10d rendezvous to a checkpoint, and beside it the
same job preempted -> checkpoint -> requeue -> the same final parameters; a cancelled job
checkpoints and stays cancelled; a requeue SLURM refuses fails the job; Hydra sweeps sent to
SLURM by hydra-submitit-launcher, and submitit's USR2 checkpoints before it requeues."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cluster import SlurmCluster, steps_logged
from fbi_testing import REPO

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]
log = logging.getLogger(__name__)

SCRIPT = REPO / "launch" / "slurm" / "train.sbatch"
# The script's #SBATCH lines are for a GPU cluster; the fixture's nodes have CPUs only.
CPU_JOB = ["--partition=debug", "--gpus-per-node=0", "--cpus-per-task=1", "--time=15"]


def submit(slurm: SlurmCluster, run_dir: Path, overrides: list[str], *sbatch_args: str) -> int:
    env = {"RUN_DIR": str(run_dir), "PYTHON": sys.executable, "RDZV_TIMEOUT": "60",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return slurm.sbatch(*CPU_JOB, f"--output={run_dir.parent}/%x-%j.out", *sbatch_args,
                        str(SCRIPT), *overrides, cwd=REPO, env=env)


def wait_for_step(slurm: SlurmCluster, job: int, run_dir: Path, step: int,
                  timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not any(s >= step for s in steps_logged(run_dir)):
        assert slurm.job(job)["JobState"] in ("PENDING", "RUNNING") and \
            time.monotonic() < deadline, job_log(run_dir, job)[-4000:] + slurm.logs()
        time.sleep(0.05)


def wait_for_text(path_text, needle: str, timeout: float = 120) -> str:
    """Poll ``path_text()`` until it contains ``needle``; the text."""
    deadline = time.monotonic() + timeout
    while needle not in (text := path_text()):
        assert time.monotonic() < deadline, f"no {needle!r} in:\n{text[-4000:]}"
        time.sleep(0.2)
    return text


def stopped_at(text: str, signal_name: str) -> int:
    return int(re.search(rf"stopped after step (\d+) on {signal_name}", text).group(1))


def job_log(run_dir: Path, job_id: int) -> str:
    return "\n".join(p.read_text() for p in run_dir.parent.glob(f"*-{job_id}.out"))


def final_parameters(run_dir: Path) -> dict[str, torch.Tensor]:
    from fbi.consolidate import consolidate

    return consolidate(run_dir)


def test_hydra_multirun_sends_each_combination_to_slurm(slurm, overrides, tmp_path):
    # hydra-submitit-launcher: each job is a plain `srun` of 2 tasks on 2 nodes, which
    # fbi.distributed maps to ranks through SLURM's variables (no torchrun).
    env = {**slurm.env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "train.py", "-m", "hydra/launcher=slurm", "hydra.launcher.partition=debug",
         "hydra.launcher.gpus_per_node=0", "hydra.launcher.nodes=2",
         "hydra.launcher.tasks_per_node=1", "hydra.launcher.cpus_per_task=1",
         "hydra.launcher.timeout_min=10", f"hydra.sweep.dir={tmp_path}/sweep", *overrides,
         "max_steps=2", f"run_dir={tmp_path}/runs/" + "${hydra:job.num}", "optim.lr=1e-3,2e-3"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=400,
    )
    logs = "\n".join(p.read_text() for p in (tmp_path / "sweep").rglob("*_log.*"))
    assert proc.returncode == 0, proc.stderr[-3000:] + logs[-4000:]
    for job in ("0", "1"):
        run = tmp_path / "runs" / job
        assert steps_logged(run) == [1, 2]
        assert (run / "checkpoints" / "step_00000002" / "complete.json").exists()
    assert logs.count("slurm launch") == 2  # rank 0 of each job: SLURM's variables, 2 ranks
    assert "rank 0/2" in logs


def test_preempted_job_checkpoints_requeues_and_ends_like_an_uninterrupted_one(
        slurm, overrides, tmp_path):
    args = overrides + ["max_steps=200", "optim.decay_steps=200", "checkpoint_every=1000",
                        "zero=stage1"]
    straight, preempted = tmp_path / "straight", tmp_path / "preempted"
    started = time.monotonic()
    reference = submit(slurm, straight, args)
    job = submit(slurm, preempted, args)
    wait_for_step(slurm, job, preempted, 20)
    deadline = time.monotonic() + 300
    # What --signal=B:USR1@300 does 300 s before the time limit: USR1 to the batch script.
    signalled = time.time()
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job)], env=slurm.env, check=True)
    # Requeued and its first incarnation gone (a requeued job is COMPLETING until then).
    while (info := slurm.job(job)).get("Restarts") != "1" or info["JobState"] != "PENDING":
        assert time.monotonic() < deadline, job_log(preempted, job)[-4000:] + slurm.logs()
        time.sleep(0.2)
    # SLURM holds a requeued job for two minutes before it may start again, because a slurmd
    # refuses to launch a job id it has just killed ("already killed, do not launch batch
    # job") and the job would fail. Shorten the hold to what that takes on one machine.
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now+10"], env=slurm.env,
                   check=True)
    ref_info = slurm.wait(reference, timeout=400)
    log.warning("2-node job (200 steps, beside the preempted one): %.1f s",
                time.monotonic() - started)
    info = slurm.wait(job, timeout=400)
    text = job_log(preempted, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", \
        text[-4000:] + slurm.logs()
    # The uninterrupted job: one torchrun on each of the 2 nodes, joined by the rendezvous.
    ref_text = job_log(straight, reference)
    assert ref_info["JobState"] == "COMPLETED", ref_text[-4000:] + slurm.logs()
    assert ref_info["NumNodes"] == "2" and "world 2" in ref_text
    assert (straight / "checkpoints" / "step_00000200" / "complete.json").exists()

    stopped = int(re.search(r"stopped after step (\d+) on SIGUSR1", text).group(1))
    tag = preempted / "checkpoints" / f"step_{stopped:08d}"
    assert f"resumed from {tag} at step {stopped}" in text
    steps = steps_logged(preempted)
    assert steps == list(range(1, 201))  # no step lost, none trained twice
    seconds = (tag / "complete.json").stat().st_mtime - signalled
    log.warning("preemption: signal at step >= 20, checkpoint of step %d %.2f s later; "
                "steps lost %d", stopped, seconds, len(steps) - len(set(steps)))
    a, b = final_parameters(preempted), final_parameters(straight)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_scancel_checkpoints_and_ends_cancelled_without_requeue(slurm, overrides, tmp_path):
    run = tmp_path / "run"
    job = submit(slurm, run, overrides + ["max_steps=400", "optim.decay_steps=400",
                                          "checkpoint_every=1000"])
    wait_for_step(slurm, job, run, 10)
    subprocess.run(["scancel", str(job)], env=slurm.env, check=True)
    text = wait_for_text(lambda: job_log(run, job), "not requeued")
    stopped = stopped_at(text, "SIGTERM")
    assert (run / "checkpoints" / f"step_{stopped:08d}" / "complete.json").exists(), text[-4000:]
    info = slurm.wait(job, timeout=60)
    time.sleep(3)  # a requeue by the script would have made it PENDING again by now
    info = slurm.job(job)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", text[-4000:]
    assert "requeueing" not in job_log(run, job)


def test_a_requeue_that_slurm_refuses_fails_the_job(slurm, overrides, tmp_path):
    run = tmp_path / "run"
    job = submit(slurm, run, overrides + ["max_steps=400", "optim.decay_steps=400",
                                          "checkpoint_every=1000"], "--no-requeue")
    wait_for_step(slurm, job, run, 10)
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job)], env=slurm.env, check=True)
    info = slurm.wait(job, timeout=300)
    text = job_log(run, job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "75:0", text[-4000:]
    assert "SLURM refused to requeue" in text and info["Restarts"] == "0"
    stopped = stopped_at(text, "SIGUSR1")
    assert (run / "checkpoints" / f"step_{stopped:08d}" / "complete.json").exists()


def test_submitit_usr2_checkpoints_before_the_requeue(slurm, overrides, tmp_path):
    """What submitit's --signal=USR2@90 does before the time limit: fbi checkpoints at the
    next step, then submitit's handler requeues; the requeued job resumes and finishes."""
    env = {**slurm.env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "train.py", "-m", "hydra/launcher=slurm", "hydra.launcher.partition=debug",
         "hydra.launcher.gpus_per_node=0", "hydra.launcher.nodes=2",
         "hydra.launcher.tasks_per_node=1", "hydra.launcher.cpus_per_task=1",
         "hydra.launcher.timeout_min=10", f"hydra.sweep.dir={tmp_path}/sweep", *overrides,
         "max_steps=200", "optim.decay_steps=200", "checkpoint_every=1000", f"run_dir={run}",
         "resume=auto"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    logs = lambda: "\n".join(p.read_text() for p in (tmp_path / "sweep").rglob("*_log.*"))  # noqa: E731
    try:
        deadline = time.monotonic() + 300
        while not any(s >= 20 for s in steps_logged(run)):
            assert proc.poll() is None and time.monotonic() < deadline, logs()[-4000:]
            time.sleep(0.05)
        job = int(subprocess.run(["squeue", "-h", "-o", "%A"], env=slurm.env, check=True,
                                 capture_output=True, text=True).stdout.split()[0])
        subprocess.run(["scancel", "--signal=USR2", str(job)], env=slurm.env, check=True)
        while (info := slurm.job(job)).get("Restarts") != "1" or info["JobState"] != "PENDING":
            assert time.monotonic() < deadline, logs()[-4000:] + slurm.logs()
            time.sleep(0.2)
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now+10"],
                       env=slurm.env, check=True)  # see the USR1 test: SLURM's requeue hold
        out = proc.communicate(timeout=400)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = logs()
    assert proc.returncode == 0, out[-3000:] + text[-4000:]
    stopped = stopped_at(text, "SIGUSR2")
    tag = run / "checkpoints" / f"step_{stopped:08d}"
    assert f"resumed from {tag} at step {stopped}" in text  # written before the requeue
    assert "Requeued job" in text
    assert steps_logged(run) == list(range(1, 201))
