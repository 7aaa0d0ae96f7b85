"""Real clusters on one machine, for the launch tests: a SLURM controller with two slurmd
"nodes" (munge auth), and two network namespaces with their own addresses and hostnames.

Both need root and the system packages that .ci/run installs (slurm-wlm, munge, iproute2);
``why_not_slurm``/``why_not_netns`` say why a machine cannot host them.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

from fbi.distributed import free_port


def _run(*cmd: str, env: dict | None = None, check: bool = True, timeout: float = 30):
    return subprocess.run(cmd, capture_output=True, text=True, env=env, check=check,
                          timeout=timeout)


def steps_logged(run_dir: Path) -> list[int]:
    """The steps in ``run_dir/metrics.jsonl``, in the order they were logged."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines()
            if '"loss"' in line]


def why_not_slurm() -> str | None:
    if os.geteuid() != 0:
        return "SLURM fixture needs root (it starts munged, slurmctld and slurmd)"
    missing = [b for b in ("slurmctld", "slurmd", "sbatch", "munged", "munge")
               if shutil.which(b) is None and not Path(f"/usr/sbin/{b}").exists()]
    if missing:
        return f"SLURM fixture needs {', '.join(missing)} (apt-get install slurm-wlm munge)"
    return None


def why_not_netns() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        return "network namespaces need iproute2 and util-linux (ip, unshare)"
    probe = f"fbiprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode:
        return f"ip netns add failed here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class SlurmCluster:
    """slurmctld + one slurmd per node name, all on this host (``NodeAddr=127.0.0.1``).
    ``task_plugin`` task/affinity binds each task to the CPUs of its step (as clusters do)."""

    def __init__(self, root: Path, nodes: tuple[str, ...] = ("n1", "n2"),
                 task_plugin: str = "task/none"):
        self.root, self.nodes, self.task_plugin = root, nodes, task_plugin
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        # A munged of this cluster's own, in munge's directory (it runs as the munge user):
        # one shared by two test sessions was stopped by the one that started it, under
        # the other's jobs.
        self.munge = Path("/run/munge") / f"fbi-{os.getpid()}-{root.name}"
        self.daemons: list[subprocess.Popen] = []
        self.job_lock: int | None = None

    def _write_conf(self) -> None:
        host = socket.gethostname().split(".")[0]
        cpus = os.cpu_count() or 1
        lines = [
            "ClusterName=fbitest", f"SlurmctldHost={host}(127.0.0.1)",
            f"FirstJobId={self._job_ids()}",
            f"SlurmctldPort={free_port()}", "SlurmUser=root", "AuthType=auth/munge",
            f"AuthInfo=socket={self.munge}.socket", "CredType=cred/munge",
            "MailProg=/bin/true", "MpiDefault=none",
            "ProctrackType=proctrack/linuxproc", f"TaskPlugin={self.task_plugin}",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "ReturnToService=2",
            "SchedulerType=sched/backfill", "KillWait=10", "MinJobAge=300", "InactiveLimit=0",
            f"StateSaveLocation={self.root}/state", f"SlurmdSpoolDir={self.root}/spool-%n",
            f"SlurmctldPidFile={self.root}/slurmctld.pid", f"SlurmdPidFile={self.root}/slurmd-%n.pid",
            f"SlurmctldLogFile={self.root}/slurmctld.log", f"SlurmdLogFile={self.root}/slurmd-%n.log",
        ]
        lines += [f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={free_port()} "
                  f"CPUs={cpus} RealMemory=2000" for n in self.nodes]
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES "
                     "MaxTime=INFINITE State=UP OverSubscribe=FORCE:4")
        (self.root / "state").mkdir(parents=True, exist_ok=True)
        self.conf.write_text("\n".join(lines) + "\n")

    def _job_ids(self) -> int:
        """The first job id of a block of 20 that no other live test cluster on this host
        holds. fbi.distributed derives a plain srun step's master port from the job id
        (unique on a real cluster); two test clusters both starting at job 1 met on one port."""
        for i in range(850):  # 850 blocks of 20: the port derivation's 17,000 ids
            block = (os.getpid() + i) % 850
            fd = os.open(f"/tmp/fbi-slurm-jobs-{block}.lock", os.O_CREAT | os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self.job_lock = fd  # held until stop(); a process that dies releases it
            return 1 + 20 * block
        raise RuntimeError("every block of SLURM job ids is held by another test cluster")

    def _munge(self) -> None:
        self.munge.parent.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.munge.parent, "munge", "munge")
        _run("runuser", "-u", "munge", "--", "/usr/sbin/munged", f"--socket={self.munge}.socket",
             f"--pid-file={self.munge}.pid", f"--log-file={self.munge}.log",
             f"--seed-file={self.munge}.seed")
        for _ in range(50):
            if _run("munge", "-n", f"--socket={self.munge}.socket", check=False).returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"munged did not come up: see {self.munge}.log")

    def start(self, timeout: float = 60) -> float:
        """Start everything and wait until every node is idle; return the seconds it took."""
        t0 = time.monotonic()
        self._write_conf()
        self._munge()
        log = open(self.root / "daemons.out", "w")
        self.daemons.append(subprocess.Popen(
            ["slurmctld", "-D", "-i", "-f", str(self.conf)], stdout=log, stderr=log))
        for n in self.nodes:
            self.daemons.append(subprocess.Popen(
                ["slurmd", "-D", "-f", str(self.conf), "-N", n], stdout=log, stderr=log))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = _run("sinfo", "-h", "-N", "-o", "%N %t", env=self.env, check=False).stdout
            states = dict(line.split() for line in out.splitlines() if line.strip())
            if len(states) == len(self.nodes) and all(s == "idle" for s in states.values()):
                return time.monotonic() - t0
            time.sleep(0.3)
        raise RuntimeError(f"SLURM nodes not idle after {timeout} s:\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(p.read_text()[-3000:] for p in sorted(self.root.glob("*.log")))

    def sbatch(self, *args: str, cwd: Path, env: dict | None = None) -> int:
        out = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, capture_output=True,
                             text=True, timeout=60, env={**self.env, **(env or {})})
        if out.returncode:
            raise RuntimeError(f"sbatch failed: {out.stderr}")
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        out = _run("scontrol", "show", "job", str(job_id), env=self.env).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: int, timeout: float) -> dict[str, str]:
        """Wait for the job to end; its final ``scontrol show job`` fields."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                    "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"):
                return info
            time.sleep(1)
        _run("scancel", str(job_id), env=self.env, check=False)
        raise TimeoutError(f"job {job_id} still {info['JobState']} after {timeout} s")

    def stop(self) -> None:
        _run("scancel", "--user=root", env=self.env, check=False)
        for p in reversed(self.daemons):  # slurmd first, then slurmctld, then munged
            p.terminate()
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        pid = Path(f"{self.munge}.pid")
        if pid.exists():
            os.kill(int(pid.read_text()), 15)
        for leftover in self.munge.parent.glob(f"{self.munge.name}.*"):  # its log, seed, socket
            leftover.unlink(missing_ok=True)
        if self.job_lock is not None:
            os.close(self.job_lock)


def node_names() -> tuple[str, str]:
    """Two namespace (and host) names of this process's own: network namespaces are global
    to the machine, and a second test session (another checkout, the stress check's second
    worker) that used the same names would delete this one's nodes under its tests."""
    return f"fbi{os.getpid()}n1", f"fbi{os.getpid()}n2"


class Namespaces:
    """Network namespaces ``names`` joined by one bridge-less veth pair each way (two nodes),
    addresses 10.211.0.{1,2}/24, each with a hosts file naming both."""

    def __init__(self, names: tuple[str, str]):
        self.names = names
        self.addrs = {n: f"10.211.0.{i + 1}" for i, n in enumerate(names)}

    def __enter__(self) -> "Namespaces":
        a, b = self.names
        self.__exit__()
        for n in self.names:
            _run("ip", "netns", "add", n)
        # made inside the namespaces, so their names cannot meet another session's
        _run("ip", "link", "add", "fbiveth1", "netns", a, "type", "veth", "peer", "name",
             "fbiveth2", "netns", b)
        hosts = "127.0.0.1 localhost\n" + "".join(f"{ip} {n}\n" for n, ip in self.addrs.items())
        for n, dev in zip(self.names, ("fbiveth1", "fbiveth2")):
            _run("ip", "-n", n, "addr", "add", f"{self.addrs[n]}/24", "dev", dev)
            _run("ip", "-n", n, "link", "set", dev, "up")
            _run("ip", "-n", n, "link", "set", "lo", "up")
            Path(f"/etc/netns/{n}").mkdir(parents=True, exist_ok=True)
            Path(f"/etc/netns/{n}/hosts").write_text(hosts)
            # No DNS server is reachable from inside: fail lookups of other names at once
            # instead of after the resolver's timeouts (about a minute per process start).
            Path(f"/etc/netns/{n}/resolv.conf").write_text("nameserver 127.0.0.1\n")
        return self

    def __exit__(self, *exc) -> None:
        for n in self.names:
            subprocess.run(["ip", "netns", "del", n], capture_output=True)
            shutil.rmtree(f"/etc/netns/{n}", ignore_errors=True)

    def command(self, node: str, argv: list[str], hostname: str | None = None) -> list[str]:
        """``argv`` run inside ``node``'s namespace, with ``hostname`` (default ``node``) as
        its hostname."""
        return ["ip", "netns", "exec", node, "unshare", "--uts", "sh", "-c",
                f'hostname {hostname or node} && exec "$@"', "sh", *argv]
