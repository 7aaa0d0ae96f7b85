"""fbi.distributed: launcher variables -> rank/local rank/world/master/device, refusals, and
real gloo groups formed from torchrun-style and srun-style variables."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from fbi.distributed import (
    LaunchError, ProcessEnv, choose_device, detect, expand_nodelist, free_port, resolve_master,
    tasks_per_node, wait_for_master,
)
from fbi_testing import REPO

TORCHRUN = {"TORCHELASTIC_RUN_ID": "j1", "RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8",
            "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1", "MASTER_ADDR": "node1",
            "MASTER_PORT": "29500"}
DEEPSPEED = {"RANK": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "4", "CROSS_RANK": "1",
             "CROSS_SIZE": "2", "LOCAL_SIZE": "2", "MASTER_ADDR": "10.0.0.1",
             "MASTER_PORT": "29600"}
# srun --nodes=2 --ntasks-per-node=2 python train.py: the 4th task (second on node gpu08)
SRUN = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
        "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4", "SLURM_TASKS_PER_NODE": "2(x2)",
        "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_STEP_NODELIST": "gpu[07-08]"}


def test_torchrun_variables():
    assert detect(TORCHRUN) == ProcessEnv("torchrun", 5, 1, 8, 4, "node1", 29500)


def test_deepspeed_launcher_variables():
    assert detect(DEEPSPEED) == ProcessEnv("deepspeed", 2, 0, 4, 2, "10.0.0.1", 29600)


def test_plain_srun_variables():
    # master: the first node of the step; port: derived from the job id (jobs sharing a node)
    assert detect(SRUN) == ProcessEnv("slurm", 3, 1, 4, 2, "gpu07", 15000 + 4242)
    assert detect({**SRUN, "MASTER_PORT": "23456"}).master_port == 23456


def test_slurm_ports_stay_below_the_ephemeral_range():
    # Linux hands out 32768-60999 to outgoing connections: a port there may be taken.
    low, _ = map(int, open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
    ports = {detect({**SRUN, "SLURM_JOB_ID": str(job)}).master_port for job in range(0, 10**6, 7)}
    assert max(ports) < low and min(ports) >= 1024


def test_arbitrary_distribution_master_is_task_0s_node(tmp_path):
    # srun --distribution=arbitrary with SLURM_HOSTFILE: task i runs on line i's node
    hostfile = tmp_path / "hosts"
    hostfile.write_text("gpu08\ngpu07\ngpu08\ngpu07\n")
    env = {**SRUN, "SLURM_DISTRIBUTION": "arbitrary", "SLURM_HOSTFILE": str(hostfile)}
    assert detect(env).master_addr == "gpu08"
    assert detect({**SRUN, "SLURM_DISTRIBUTION": "block"}).master_addr == "gpu07"
    with pytest.raises(LaunchError, match="SLURM_HOSTFILE=.*MASTER_ADDR"):
        detect({**env, "SLURM_HOSTFILE": str(tmp_path / "missing")})


def test_no_launcher_and_the_sbatch_script_itself_are_a_group_of_one():
    assert detect({}) == ProcessEnv("single", 0, 0, 1, 1, "127.0.0.1", 0)
    batch = {k: v for k, v in SRUN.items() if not k.startswith("SLURM_STEP")}
    batch.update(SLURM_PROCID="0", SLURM_LOCALID="0")
    assert detect(batch).launcher == "single"


def test_one_torchrun_per_node_inside_slurm_agrees():
    # launch/slurm: srun --ntasks-per-node=1 over 2 nodes, torchrun with 4 processes each
    env = {**TORCHRUN, "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2"}
    assert detect(env).rank == 5


@pytest.mark.parametrize("environ,match", [
    # torchrun --standalone under srun with 4 tasks per node: 4 independent groups
    ({**TORCHRUN, "RANK": "1", "WORLD_SIZE": "4", "SLURM_PROCID": "2", "SLURM_NTASKS": "4",
      "SLURM_STEP_NUM_TASKS": "4"}, "WORLD_SIZE=4 from torchrun contradicts the SLURM step's 4"),
    ({**SRUN, "RANK": "3", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "a",
      "MASTER_PORT": "1"}, "WORLD_SIZE=2 from env contradicts"),
    ({**SRUN, "WORLD_SIZE": "8"}, "WORLD_SIZE=8 contradicts SLURM_NTASKS=4"),
    ({**SRUN, "SLURM_STEP_NUM_TASKS": "1"}, "this srun step runs part of the allocation"),
    ({**TORCHRUN, "RANK": "8"}, "rank 8 is outside the world size 8"),
    ({**TORCHRUN, "LOCAL_RANK": "4"}, "local rank 4 with 4 processes"),
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set but RANK is not"),
    ({"RANK": "0", "LOCAL_RANK": "0"}, "WORLD_SIZE is not set"),
    ({k: v for k, v in DEEPSPEED.items() if k != "MASTER_PORT"}, "MASTER_PORT is not set"),
    ({**DEEPSPEED, "RANK": "two"}, "RANK='two' is not an integer"),
])
def test_contradictory_or_partial_launches_are_refused(environ, match):
    with pytest.raises(LaunchError, match=match):
        detect(environ)


@pytest.mark.parametrize("nodelist,hosts", [
    ("n1", ["n1"]),
    ("n[1-3]", ["n1", "n2", "n3"]),
    ("gpu[08-11,15],login1", ["gpu08", "gpu09", "gpu10", "gpu11", "gpu15", "login1"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("a-[9-10].cluster,b", ["a-9.cluster", "a-10.cluster", "b"]),
])
def test_nodelist_expansion(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_tasks_per_node():
    assert tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    with pytest.raises(LaunchError, match="SLURM_TASKS_PER_NODE"):
        tasks_per_node("2x3")


def test_each_local_rank_gets_its_own_gpu():
    for local in range(4):
        env = detect({**TORCHRUN, "LOCAL_RANK": str(local), "RANK": str(4 + local)})
        assert choose_device("auto", env, cuda_count=4) == f"cuda:{local}"
        assert choose_device("cpu", env, cuda_count=4) == "cpu"
    assert choose_device("auto", detect(TORCHRUN), cuda_count=0) == "cpu"
    # SLURM --gpus-per-task leaves each task one visible GPU: index 0, whatever the local id
    assert choose_device("auto", detect(SRUN), cuda_count=1) == "cuda:0"


def test_gpus_per_task_above_one_is_accepted_with_a_warning(caplog):
    # srun --gpus-per-task=2: the task sees its own 2 GPUs (a GPU count stands in
    # for the GPUs this machine does not have)
    env = detect({**SRUN, "SLURM_LOCALID": "1"})
    assert choose_device("auto", env, cuda_count=2, gpus_per_task=2) == "cuda:0"
    assert "2 GPUs" in caplog.text and "1 idle" in caplog.text


def test_gpus_asked_for_but_absent_are_refused():
    env = detect(TORCHRUN)
    with pytest.raises(LaunchError, match="distributed.device=cuda but torch sees no GPU"):
        choose_device("cuda", env, cuda_count=0)
    with pytest.raises(LaunchError, match="SLURM allocated 4 GPU"):
        choose_device("auto", env, cuda_count=0, slurm_gpus=4)
    with pytest.raises(LaunchError, match="local rank 1 has no GPU of its own: 1 visible"):
        choose_device("auto", env, cuda_count=1)


def test_a_node_name_that_does_not_resolve_is_refused_at_once():
    start = time.monotonic()
    with pytest.raises(LaunchError, match="'n1.invalid' does not resolve"):
        resolve_master("n1.invalid", 29500, lambda name: None)
    # SLURM's NodeAddr for the node is used when DNS does not know it
    assert resolve_master("n1.invalid", 29500, lambda name: "127.0.0.1") == "127.0.0.1"
    assert time.monotonic() - start < 30


def test_an_unreachable_rendezvous_times_out_with_a_clear_error():
    start = time.monotonic()
    with pytest.raises(LaunchError, match="unreachable for 1 s"):
        wait_for_master("127.0.0.1", free_port(), timeout_s=1)
    assert time.monotonic() - start < 10


INIT = """
import json, sys
import torch, torch.distributed as dist
from fbi.config import DistributedConfig
from fbi.distributed import init_distributed
from fbi.process_exit import run_and_exit
def main():
    info = init_distributed(DistributedConfig(rendezvous_timeout_s=20, timeout_s=float(sys.argv[1])))
    t = torch.tensor([info.rank + 1.0])
    dist.all_reduce(t)
    print(json.dumps({"rank": info.rank, "world": info.world_size, "local": info.local_rank,
                      "device": info.device, "backend": dist.get_backend(), "sum": t.item()}))
    dist.destroy_process_group()
run_and_exit(main)  # a live gloo thread can abort the interpreter's teardown
"""


def start(environ: dict, timeout_s: float = 60) -> subprocess.Popen:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("SLURM_", "TORCHELASTIC")) and k not in
             ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return subprocess.Popen(
        [sys.executable, "-c", INIT, str(timeout_s)], cwd=REPO, text=True,
        env={**clean, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **environ},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


@pytest.mark.multiprocess
def test_plain_srun_variables_form_one_gloo_group():
    import json

    port = str(free_port())
    procs = [start({**SRUN, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r % 2),
                    "SLURM_NODEID": str(r // 2), "SLURM_JOB_NODELIST": "localhost",
                    "SLURM_STEP_NODELIST": "localhost", "MASTER_PORT": port})
             for r in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    got = sorted((json.loads(o.strip().splitlines()[-1]) for o, _ in outs), key=lambda d: d["rank"])
    assert [(d["rank"], d["local"], d["world"]) for d in got] == [(r, r % 2, 4) for r in range(4)]
    assert all(d["device"] == "cpu" and d["backend"] == "gloo" and d["sum"] == 10 for d in got)


@pytest.mark.multiprocess
def test_a_missing_rank_is_an_error_after_the_timeout_not_a_hang():
    alone = start({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": str(free_port())}, timeout_s=3)
    _, err = alone.communicate(timeout=120)
    assert alone.returncode != 0
    assert "not all 2 ranks joined within distributed.timeout_s=3" in err


def test_flight_recorder_dumps_into_the_run_dir_whatever_the_launcher(tmp_path):
    """What init_distributed exports before an NCCL group forms (no GPU here to form one):
    the dump goes to the run directory for every launcher, not only train.sbatch's."""
    from fbi.distributed import flight_recorder_env

    env = flight_recorder_env({}, tmp_path / "run")
    assert env["TORCH_FR_DUMP_TEMP_FILE"] == str(tmp_path / "run" / "flight_recorder" / "rank_")
    assert (tmp_path / "run" / "flight_recorder").is_dir()
    assert env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1" and int(env["TORCH_FR_BUFFER_SIZE"]) > 0
    mine = flight_recorder_env({"TORCH_FR_DUMP_TEMP_FILE": "/scratch/fr/r"}, tmp_path / "run")
    assert mine["TORCH_FR_DUMP_TEMP_FILE"] == "/scratch/fr/r"  # the user's own wins


def test_rank_0s_store_listens_next_to_the_rendezvous_not_on_an_ephemeral_port(caplog):
    """Under torchrun (agent store) rank 0 hosts the process group's store on the port after
    the rendezvous', which a firewall can open; where that port is taken, another one with a
    warning naming both."""
    import socket
    from datetime import timedelta

    import torch.distributed as dist

    from fbi.config import DistributedConfig
    from fbi.distributed import STORE_KEY, fresh_store

    settings = DistributedConfig(rendezvous_timeout_s=10, timeout_s=10)
    while True:  # a free port whose next one is free as well
        agent_port = free_port()
        try:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", agent_port + 1))
            break
        except OSError:
            continue
    agent = dist.TCPStore("127.0.0.1", agent_port, 2, is_master=True,
                          timeout=timedelta(seconds=10), wait_for_workers=False)
    store = fresh_store("127.0.0.1", agent_port, 0, 2, settings)
    assert agent.get(STORE_KEY).decode() == f"127.0.0.1:{agent_port + 1}"
    store.set("k", "v")
    client = dist.TCPStore("127.0.0.1", agent_port + 1, is_master=False,
                           timeout=timedelta(seconds=10))
    assert client.get("k") == b"v"
    del store, client
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        other = free_port()
        squatter.bind(("0.0.0.0", other + 1))
        squatter.listen()
        busy_agent = dist.TCPStore("127.0.0.1", other, 2, is_master=True,
                                   timeout=timedelta(seconds=10), wait_for_workers=False)
        fallback = fresh_store("127.0.0.1", other, 0, 2, settings)
        port = int(busy_agent.get(STORE_KEY).decode().rpartition(":")[2])
        assert port not in (other + 1, 0) and port == fallback.port
        assert f"cannot listen on 127.0.0.1:{other + 1}" in caplog.text
        assert f"listens on {port} instead" in caplog.text and "RDZV_PORT" in caplog.text
        del busy_agent, fallback
