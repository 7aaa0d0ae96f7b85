"""The process environment: who this process is in the job, which device it drives, and the
process group. The only module that reads launcher variables.

Launchers, recognised in this order:

- torchrun (``TORCHELASTIC_RUN_ID``) and the deepspeed launcher (``CROSS_RANK``) export
  ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` themselves
  (so does a user who exports them by hand: launcher ``env``);
- SLURM alone, inside an ``srun`` step (``srun python train.py``): ``SLURM_PROCID``,
  ``SLURM_LOCALID``, ``SLURM_NTASKS``; the master is task 0's node (the first node of the
  step's node list, or the first line of ``SLURM_HOSTFILE`` under ``--distribution=arbitrary``),
  the port derived from the job id so that two jobs sharing a node do not collide, and below
  Linux's ephemeral range (32768-60999), where a port may already be taken by any connection;
- none of them: a group of one.

Under torchrun or the deepspeed launcher inside a SLURM allocation, the launcher's variables
describe the processes and SLURM's the allocation; both must agree (one launcher per SLURM
task), otherwise several independent runs would share one run directory.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import socket
import struct
import subprocess
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Mapping

import torch
import torch.distributed as dist

from fbi.config import DistributedConfig

log = logging.getLogger(__name__)


class LaunchError(RuntimeError):
    """The launch is wrong or cannot proceed; the message says which variable and the fix."""


@dataclass(frozen=True)
class ProcessEnv:
    """This process's place in the job, as the launcher described it."""

    launcher: str  # torchrun | deepspeed | env | slurm | single
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int = 0
    device: str = "cpu"  # cpu | cuda:<local index>

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list, expanded in order: ``gpu[01-03,7],login1`` ->
    ``gpu01 gpu02 gpu03 gpu7 login1``; several bracket groups multiply (``r[1-2]n[1-2]``)."""
    hosts: list[str] = []
    for item in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", nodelist):
        names = [""]
        for literal, ranges in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", item):
            choices = [literal]
            if ranges:
                choices = []
                for part in ranges.split(","):
                    lo, _, hi = part.partition("-")
                    if not lo.isdigit() or (hi and not hi.isdigit()):
                        raise LaunchError(f"SLURM node list {nodelist!r}: cannot read range {part!r}")
                    width = len(lo)
                    choices += [literal + str(i).zfill(width) for i in range(int(lo), int(hi or lo) + 1)]
            names = [n + c for n in names for c in choices]
        hosts += [n for n in names if n]
    return hosts


def tasks_per_node(spec: str) -> list[int]:
    """``SLURM_TASKS_PER_NODE`` (``2(x3),1``) -> ``[2, 2, 2, 1]``."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise LaunchError(f"SLURM_TASKS_PER_NODE={spec!r}: cannot read {part!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def _int(environ: Mapping[str, str], name: str, launcher: str) -> int:
    if name not in environ:
        raise LaunchError(
            f"{name} is not set although {launcher} variables are; a launcher sets them all. "
            "Start through torchrun, the deepspeed launcher or srun, or unset the partial set"
        )
    try:
        return int(environ[name])
    except ValueError:
        raise LaunchError(f"{name}={environ[name]!r} is not an integer") from None


def _in_srun_step(environ: Mapping[str, str]) -> bool:
    # The batch script itself also has SLURM_PROCID=0; only srun sets the step's task count.
    return "SLURM_PROCID" in environ and "SLURM_STEP_NUM_TASKS" in environ


def detect(environ: Mapping[str, str]) -> ProcessEnv:
    """Read the launcher's variables; refuse incomplete or contradictory ones."""
    if "RANK" in environ:
        launcher = ("torchrun" if "TORCHELASTIC_RUN_ID" in environ
                    else "deepspeed" if "CROSS_RANK" in environ else "env")
        world = _int(environ, "WORLD_SIZE", launcher)
        local_world = int(environ.get("LOCAL_WORLD_SIZE") or environ.get("LOCAL_SIZE") or 1)
        env = ProcessEnv(
            launcher, _int(environ, "RANK", launcher), _int(environ, "LOCAL_RANK", launcher),
            world, local_world, environ.get("MASTER_ADDR", "127.0.0.1"),
            int(environ.get("MASTER_PORT", 0)),
        )
        if world > 1:
            _int(environ, "MASTER_PORT", launcher)
            if "MASTER_ADDR" not in environ:
                raise LaunchError(f"MASTER_ADDR is not set although {launcher} variables are")
        if _in_srun_step(environ):
            _check_agrees_with_slurm(env, environ)
    elif _in_srun_step(environ):
        env = _from_slurm(environ)
    else:
        for name in ("WORLD_SIZE", "LOCAL_RANK"):
            if name in environ and environ[name] != ("1" if name == "WORLD_SIZE" else "0"):
                raise LaunchError(
                    f"{name}={environ[name]} is set but RANK is not: an incomplete launch. "
                    "Start through torchrun, the deepspeed launcher or srun, or unset it"
                )
        env = ProcessEnv("single", 0, 0, 1, 1, "127.0.0.1", 0)
    _check_ranges(env)
    return env


def _from_slurm(environ: Mapping[str, str]) -> ProcessEnv:
    world = _int(environ, "SLURM_NTASKS", "SLURM")
    step_tasks = _int(environ, "SLURM_STEP_NUM_TASKS", "SLURM")
    if step_tasks != world:
        raise LaunchError(
            f"SLURM_STEP_NUM_TASKS={step_tasks} but SLURM_NTASKS={world}: this srun step runs "
            "part of the allocation; run srun with all of the job's tasks (no -n/--ntasks)"
        )
    if "WORLD_SIZE" in environ and int(environ["WORLD_SIZE"]) != world:
        raise LaunchError(
            f"WORLD_SIZE={environ['WORLD_SIZE']} contradicts SLURM_NTASKS={world}; unset "
            "WORLD_SIZE (SLURM's task count is the world size under plain srun)"
        )
    node_id = int(environ.get("SLURM_NODEID", 0))
    per_node = tasks_per_node(environ.get("SLURM_STEP_TASKS_PER_NODE")
                              or environ.get("SLURM_TASKS_PER_NODE") or str(world))
    port = environ.get("MASTER_PORT") or str(15000 + int(environ.get("SLURM_JOB_ID", 0)) % 17000)
    return ProcessEnv(
        "slurm", _int(environ, "SLURM_PROCID", "SLURM"), _int(environ, "SLURM_LOCALID", "SLURM"),
        world, per_node[min(node_id, len(per_node) - 1)],
        environ.get("MASTER_ADDR") or _task0_node(environ), int(port),
    )


def _task0_node(environ: Mapping[str, str]) -> str:
    """The node of SLURM task 0: the first of the step's nodes, except under an arbitrary
    distribution, where SLURM_HOSTFILE lists each task's node in task order."""
    if environ.get("SLURM_DISTRIBUTION", "").startswith("arbitrary"):
        hostfile = environ.get("SLURM_HOSTFILE", "")
        try:
            lines = [ln.strip() for ln in Path(hostfile).read_text().splitlines() if ln.strip()]
        except OSError as err:
            raise LaunchError(
                f"--distribution=arbitrary: cannot read SLURM_HOSTFILE={hostfile!r} ({err}) "
                "to find task 0's node; put the hostfile on a shared filesystem or export "
                "MASTER_ADDR=<task 0's node>") from None
        return expand_nodelist(lines[0])[0]
    return expand_nodelist(environ.get("SLURM_STEP_NODELIST") or environ["SLURM_JOB_NODELIST"])[0]


def _check_agrees_with_slurm(env: ProcessEnv, environ: Mapping[str, str]) -> None:
    tasks = int(environ["SLURM_STEP_NUM_TASKS"])
    if env.launcher == "env":  # the user mapped SLURM's tasks to ranks by hand
        expected, how = tasks, "one rank per SLURM task"
    else:
        expected, how = tasks * env.local_world_size, (
            f"one {env.launcher} per SLURM task, each with {env.local_world_size} processes")
    if env.world_size != expected:
        raise LaunchError(
            f"WORLD_SIZE={env.world_size} from {env.launcher} contradicts the SLURM step's "
            f"{tasks} tasks ({how} makes {expected}): the tasks would train as independent runs "
            "sharing one run directory. Start one launcher per node with the job's nodes as "
            "its rendezvous (launch/slurm/train.sbatch), or plain srun without a launcher"
        )


def _check_ranges(env: ProcessEnv) -> None:
    if not 0 <= env.rank < env.world_size:
        raise LaunchError(f"rank {env.rank} is outside the world size {env.world_size} "
                          f"({env.launcher} variables contradict each other)")
    if not 0 <= env.local_rank < env.local_world_size <= env.world_size:
        raise LaunchError(
            f"local rank {env.local_rank} with {env.local_world_size} processes on this node "
            f"and world size {env.world_size}: {env.launcher} variables contradict each other")


def choose_device(want: str, env: ProcessEnv, cuda_count: int,
                  slurm_gpus: int = 0, gpus_per_task: int = 0) -> str:
    """``cuda:<i>`` for this local rank, or ``cpu``. ``want``: auto | cuda | cpu.
    ``gpus_per_task``: SLURM's ``--gpus-per-task`` (0: not given)."""
    if want == "cpu":
        return "cpu"
    if cuda_count == 0:
        if want == "cuda" or slurm_gpus > 0:
            asked = ("distributed.device=cuda" if want == "cuda"
                     else f"SLURM allocated {slurm_gpus} GPU(s) on this node")
            raise LaunchError(
                f"{asked} but torch sees no GPU (torch {torch.__version__}, CUDA build "
                f"{torch.version.cuda}, CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); install the CUDA "
                "build (requirements-gpu.txt / the Dockerfile) or pass distributed.device=cpu"
            )
        return "cpu"
    if env.launcher == "slurm" and (cuda_count == 1 or gpus_per_task):
        # SLURM bound the task's own GPUs (--gpus-per-task): the first is index 0. fbi runs
        # one process per task, so more than one per task leaves the others idle.
        if gpus_per_task > 1:
            log.warning("SLURM gave each task %d GPUs and fbi drives one per process: %d "
                        "idle. Use --gpus-per-task=1 with one task per GPU, or one torchrun "
                        "per node (launch/slurm/train.sbatch)", gpus_per_task,
                        gpus_per_task - 1)
        return "cuda:0"
    if env.local_rank >= cuda_count:
        raise LaunchError(
            f"local rank {env.local_rank} has no GPU of its own: {cuda_count} visible on this "
            f"node for {env.local_world_size} processes; start at most {cuda_count} processes "
            "per node (torchrun --nproc_per_node, SLURM --ntasks-per-node/--gpus-per-node)"
        )
    return f"cuda:{env.local_rank}"


def shutdown_timeout(environ: Mapping[str, str]) -> int | None:
    """Seconds torchrun waits for its workers after a signal before KILL (its
    ``--shutdown-timeout``, exported by launch/torchrun_node.sh); None outside torchrun."""
    if "TORCHELASTIC_RUN_ID" not in environ:
        return None
    return int(environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT") or 30)  # torchrun's default


def _count(gres: str | None) -> int:
    """``2`` or ``a100:2`` (SLURM's GPU count syntax) -> 2; unset -> 0."""
    return int(gres.rpartition(":")[2]) if gres else 0


def slurm_node_addr(node: str) -> str | None:
    """The ``NodeAddr`` SLURM knows for ``node`` (a name that DNS may not know)."""
    if shutil.which("scontrol") is None:
        return None
    try:
        out = subprocess.run(["scontrol", "show", "node", node], capture_output=True,
                             text=True, timeout=10).stdout
    except subprocess.TimeoutExpired:
        return None
    m = re.search(r"NodeAddr=(\S+)", out)
    return m.group(1) if m else None


def resolve_master(addr: str, port: int, fallback: Callable[[str], str | None]) -> str:
    """An address for ``addr`` that resolves, or a clear error instead of a hang."""
    try:
        socket.getaddrinfo(addr, port)
        return addr
    except socket.gaierror as err:
        other = fallback(addr)
        if other is not None:
            try:
                socket.getaddrinfo(other, port)
                return other
            except socket.gaierror:
                pass
        raise LaunchError(
            f"MASTER_ADDR {addr!r} does not resolve on {socket.gethostname()} ({err.strerror}); "
            "add the node to DNS or /etc/hosts, or export MASTER_ADDR=<its IP address>"
        ) from None


def wait_for_master(addr: str, port: int, timeout_s: float) -> None:
    """Poll until rank 0's store accepts connections, or fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((addr, port), timeout=min(5.0, timeout_s)):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise LaunchError(
                    f"rendezvous {addr}:{port} unreachable for {timeout_s:.0f} s ({err}); is "
                    "rank 0 running, the port open between nodes, MASTER_ADDR the first node? "
                    "(distributed.rendezvous_timeout_s sets the wait)"
                ) from None
            time.sleep(0.5)


def interface_towards(addr: str, port: int) -> str | None:
    """The network interface this host reaches ``addr`` through (its name, e.g. ``eth0``),
    or None for loopback or when the kernel has no route."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((addr, port))  # UDP: picks the route, sends nothing
            local = probe.getsockname()[0]
    except OSError:
        return None
    if local.startswith("127."):
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:  # SIOCGIFADDR: the interface's IPv4 address (bytes 20-24 of struct ifreq)
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue
            if socket.inet_ntoa(packed[20:24]) == local:
                return name
    return None


def gloo_interface(environ: Mapping[str, str], master_addr: str, port: int) -> str | None:
    """What GLOO_SOCKET_IFNAME should be when the user did not set it: gloo binds to the
    address this host's name resolves to, and falls back to loopback when it resolves
    nowhere, so that ranks on other nodes cannot connect. Then: the interface towards the
    master. None: leave gloo's own choice."""
    if environ.get("GLOO_SOCKET_IFNAME"):
        return None
    try:
        socket.getaddrinfo(socket.gethostname(), None)
        return None
    except socket.gaierror:
        return interface_towards(master_addr, port)


def set_collective_timeout(seconds: float) -> None:
    """The default process group's collective timeout from now on (a no-op without one)."""
    if dist.is_initialized():
        dist.distributed_c10d._set_pg_timeout(timedelta(seconds=seconds))
        log.info("collective timeout now %.0f s (distributed.step_timeout_s)", seconds)


# NCCL's flight recorder: a ring of each rank's last collectives, dumped (one file per rank)
# when a collective times out; read with
# `python -m torch.distributed.flight_recorder.fr_trace <run_dir>/flight_recorder`.
FLIGHT_RECORDER = {"TORCH_FR_BUFFER_SIZE": "2000", "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",
                   "TORCH_NCCL_DUMP_ON_TIMEOUT": "1"}


def flight_recorder_env(environ: Mapping[str, str], run_dir: Path | None) -> dict[str, str]:
    """The flight recorder's variables for an NCCL group, dumping into
    ``run_dir/flight_recorder/rank_<r>`` (torch's default is the node's /tmp, lost with the
    node); whatever the user exported wins. Set here, whatever the launcher."""
    wanted = dict(FLIGHT_RECORDER)
    if run_dir is not None:
        (run_dir / "flight_recorder").mkdir(parents=True, exist_ok=True)
        wanted["TORCH_FR_DUMP_TEMP_FILE"] = str(run_dir / "flight_recorder" / "rank_")
    return {k: environ.get(k, v) for k, v in wanted.items()}


STORE_KEY = "fbi/process_group_store"


def fresh_store(agent_addr: str, agent_port: int, rank: int, world_size: int,
                settings: DistributedConfig) -> dist.Store:
    """A store of this restart's own, hosted by rank 0 and announced through torchrun's.

    torchrun keeps one store for all restarts, and the process group's keys in it outlive the
    workers that wrote them: after ``--max_restarts`` restarts a fast rank could read the dead
    rank 0's address and fail to connect. An address whose server accepts a connection is
    this restart's, because torchrun stops every worker before it forms the next group.

    Rank 0 runs on the rendezvous' first node, whose address the rendezvous resolved and
    handed out as ``agent_addr`` (torchrun ``--local-addr``, else that node's FQDN as torchrun
    resolved it); it announces that address, which the others already reached, rather than a
    name of its own that may not resolve elsewhere."""
    agent = dist.TCPStore(agent_addr, agent_port, is_master=False,
                          timeout=timedelta(seconds=settings.rendezvous_timeout_s))
    timeout = timedelta(seconds=settings.timeout_s)
    if rank == 0:
        # The port next to the rendezvous' (a firewall opens the pair; launch/slurm/
        # train.sbatch gives each job an even rendezvous port, so jobs' pairs never overlap),
        # not an ephemeral one: a restart binds the same port again (the store reuses it).
        host, port = agent_addr, agent_port + 1
        try:
            store = dist.TCPStore(host, port, world_size, is_master=True, timeout=timeout,
                                  wait_for_workers=False)
        except RuntimeError as err:  # DistNetworkError: the port is taken
            store = dist.TCPStore(host, 0, world_size, is_master=True, timeout=timeout,
                                  wait_for_workers=False)
            log.warning(
                "rank 0's process-group store cannot listen on %s:%d, the port after the "
                "rendezvous' (%s), and listens on %d instead: open that port between nodes, "
                "or give the rendezvous a port whose next one is free (RDZV_PORT, torchrun "
                "--rdzv_endpoint)", host, port, str(err).splitlines()[0], store.port)
            port = store.port
        agent.set(STORE_KEY, f"{host}:{port}")
        return store
    deadline = time.monotonic() + settings.rendezvous_timeout_s
    while True:
        host, _, port = agent.get(STORE_KEY).decode().rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
            break
        except OSError as err:  # the previous rank 0's address: wait for the new one
            if time.monotonic() >= deadline:
                raise LaunchError(
                    f"rank 0's store {host}:{port} (announced through torchrun's store) was "
                    f"unreachable for distributed.rendezvous_timeout_s="
                    f"{settings.rendezvous_timeout_s:.0f} s ({err}); if {host!r} is not this "
                    "node's address for the others, give torchrun --local-addr (LOCAL_ADDR "
                    "in launch/torchrun_node.sh)"
                ) from None
            time.sleep(0.5)
    return dist.TCPStore(host, int(port), is_master=False, timeout=timeout)


def init_distributed(settings: DistributedConfig | None = None,
                     environ: Mapping[str, str] | None = None,
                     run_dir: Path | None = None) -> Dist:
    """Bind this process's device, then join (or form) the process group: NCCL on GPU, gloo on
    CPU. Every wait is bounded by the timeouts in ``settings``; NCCL's flight recorder dumps
    into ``run_dir``."""
    settings = settings or DistributedConfig()
    environ = os.environ if environ is None else environ
    env = detect(environ)
    device = choose_device(settings.device, env, torch.cuda.device_count(),
                           int(environ.get("SLURM_GPUS_ON_NODE") or 0),
                           _count(environ.get("SLURM_GPUS_PER_TASK")))
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))  # before the first collective
    addr, port = env.master_addr, env.master_port or free_port()
    if env.world_size > 1:
        addr = resolve_master(addr, port, slurm_node_addr)
        if env.rank != 0:
            wait_for_master(addr, port, settings.rendezvous_timeout_s)
    os.environ.update(RANK=str(env.rank), LOCAL_RANK=str(env.local_rank),
                      WORLD_SIZE=str(env.world_size), MASTER_ADDR=addr, MASTER_PORT=str(port))
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        os.environ.update(flight_recorder_env(os.environ, run_dir))
    if backend == "gloo" and env.world_size > 1 and (ifname := gloo_interface(environ, addr, port)):
        log.warning("this host's name %s resolves nowhere: gloo binds to %s, the interface "
                    "towards %s (set GLOO_SOCKET_IFNAME to choose)", socket.gethostname(),
                    ifname, addr)
        os.environ["GLOO_SOCKET_IFNAME"] = ifname
    timeout = timedelta(seconds=settings.timeout_s)
    try:
        if environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and env.world_size > 1:
            store = fresh_store(addr, port, env.rank, env.world_size, settings)
            dist.init_process_group(backend, store=store, rank=env.rank,
                                    world_size=env.world_size, timeout=timeout)
        else:
            dist.init_process_group(backend, init_method="env://", rank=env.rank,
                                    world_size=env.world_size, timeout=timeout)
        dist.barrier()
    except LaunchError:
        raise
    except RuntimeError as err:  # torch's DistStoreError and gloo/NCCL timeouts among them
        raise LaunchError(
            f"not all {env.world_size} ranks joined within distributed.timeout_s="
            f"{settings.timeout_s} s ({str(err).splitlines()[0]}); check that every node "
            "started and reaches the others"
        ) from err
    log.info("rank %d/%d (local %d, %s launch) on %s, %s via %s:%d", env.rank, env.world_size,
             env.local_rank, env.launcher, device, backend, addr, port)
    return Dist(env.rank, env.world_size, env.local_rank, device)
