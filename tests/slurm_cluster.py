"""A real single-node Slurm for the tests: munged, slurmctld and slurmd from the system's
packages (Debian: apt-get install slurmctld slurmd munge), configured in a temporary directory
on free ports, started by the suite and always stopped with everything they ran."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tbss_queue.execution.procs import TAG_VAR, kill_tagged
from tbss_queue.redis_server import free_port

DAEMONS = ("munged", "slurmctld", "slurmd", "slurmstepd")
CLIENTS = ("sbatch", "scancel", "scontrol", "squeue", "sinfo")
INSTALL = "apt-get install slurmctld slurmd munge"
KILL_WAIT = 30
"""Slurm's default KillWait: the seconds between its SIGTERM and its SIGKILL."""


def missing() -> list[str]:
    """The Slurm and munge programs this machine lacks (daemons live in /usr/sbin)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return [p for p in (*DAEMONS, *CLIENTS) if shutil.which(p, path=path) is None]


def _which(name: str) -> str:
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    found = shutil.which(name, path=path)
    assert found, f"{name} is not installed ({INSTALL})"
    return found


@dataclass
class SlurmCluster:
    """One node, one partition; `proctrack` is linuxproc or cgroup (cgroup v1, freezer)."""

    dir: Path
    proctrack: str
    kill_wait: int = KILL_WAIT
    node: str = field(default_factory=lambda: f"tq{os.getpid()}x{time.monotonic_ns() % 10**6}")
    tag: str = field(default_factory=lambda: os.urandom(8).hex())
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    setup_seconds: float = 0.0
    socket_dir: Path | None = None

    @property
    def socket(self) -> Path:
        assert self.socket_dir is not None
        return self.socket_dir / "munge.socket"

    @property
    def env(self) -> dict[str, str]:
        """The environment for Slurm's client commands (and, through sbatch, for jobs)."""
        return {**os.environ, "SLURM_CONF": str(self.dir / "slurm.conf"), TAG_VAR: self.tag}

    def run(self, *argv: str, check: bool = True) -> str:
        res = subprocess.run(
            [_which(argv[0]), *argv[1:]], capture_output=True, text=True, env=self.env, timeout=30
        )
        if check:
            assert res.returncode == 0, f"{' '.join(argv)}: {res.stderr}\n{self.logs()}"
        return res.stdout

    def start(self) -> SlurmCluster:
        began = time.monotonic()
        d = self.dir
        for sub in ("munge", "state", "spool"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        # munged refuses a socket in a directory that others cannot reach (pytest's tmp dirs
        # are 0700), and a key that others can read
        self.socket_dir = Path(tempfile.mkdtemp(prefix="tbssq-munge-"))
        self.socket_dir.chmod(0o755)
        key = d / "munge" / "key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        (d / "slurm.conf").write_text(self._slurm_conf())
        # v1 where /sys/fs/cgroup holds v1 hierarchies (proctrack/cgroup uses the freezer), v2
        # where it is a cgroup2 mount; only processes are tracked, nothing is constrained
        (d / "cgroup.conf").write_text(
            "CgroupPlugin=autodetect\nCgroupMountpoint=/sys/fs/cgroup\n"
            "ConstrainCores=no\nConstrainRAMSpace=no\n"
        )
        (d / "plugstack.conf").write_text("")
        self._spawn(
            "munged",
            "-F",
            f"--socket={self.socket}",
            f"--key-file={key}",
            f"--pid-file={d / 'munge' / 'pid'}",
            f"--log-file={d / 'munge' / 'log'}",
            f"--seed-file={d / 'munge' / 'seed'}",
        )
        self._wait(self.socket.exists, "munged's socket")
        conf = str(d / "slurm.conf")
        self._spawn("slurmctld", "-D", "-f", conf)
        self._spawn("slurmd", "-D", "-f", conf, "-N", self.node)
        self._wait(lambda: self.node_state() == "idle", "the node to be idle")
        self.setup_seconds = time.monotonic() - began
        return self

    def stop(self) -> None:
        """Cancel every job, stop the daemons, kill whatever they left, remove the cgroups."""
        with contextlib.suppress(Exception):
            self.run("scancel", "--partition=test", "--signal=KILL", "--full", check=False)
        for p in reversed(self.procs):  # slurmd, slurmctld, then munged
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        # job steps (slurmstepd, the batch shell, workers, commands) carry this cluster's tag
        kill_tagged(self.tag, grace=1.0)
        for top in Path("/sys/fs/cgroup").glob(f"*/slurm_{self.node}"):
            for sub in sorted(top.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                if sub.is_dir():
                    with contextlib.suppress(OSError):
                        sub.rmdir()
            with contextlib.suppress(OSError):
                top.rmdir()
        if self.socket_dir is not None:
            shutil.rmtree(self.socket_dir, ignore_errors=True)

    def node_state(self) -> str:
        res = subprocess.run(
            [_which("sinfo"), "-h", "-n", self.node, "-o", "%T"],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=10,
        )
        return res.stdout.strip()

    def sbatch(self, script: Path, *, cwd: Path, env: dict[str, str]) -> str:
        """Submit as a user would, from `cwd` with `env` (the job's too); the job id."""
        res = subprocess.run(
            [_which("sbatch"), "--parsable", str(script)],
            capture_output=True,
            text=True,
            env={**env, "SLURM_CONF": self.env["SLURM_CONF"]},
            cwd=cwd,
            timeout=30,
        )
        assert res.returncode == 0, f"sbatch: {res.stderr}\n{self.logs()}"
        return res.stdout.strip().split(";")[0]

    def job_state(self, job: str) -> str:
        out = self.run("scontrol", "show", "job", "-o", job)
        return out.split("JobState=")[1].split()[0]

    def cgroup_pids(self, job: str) -> set[int]:
        """The processes proctrack/cgroup tracks in the job's steps (none under linuxproc)."""
        pattern = f"freezer/slurm_{self.node}/uid_*/job_{job}/step_*/cgroup.procs"
        return {int(p) for f in Path("/sys/fs/cgroup").glob(pattern) for p in f.read_text().split()}

    def logs(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "munge/log"):
            path = self.dir / name
            if path.exists():
                parts.append(f"--- {name}\n" + "".join(path.read_text().splitlines(True)[-30:]))
        return "\n".join(parts)

    def _spawn(self, name: str, *args: str) -> None:
        log = open(self.dir / f"{name}.out", "wb")  # noqa: SIM115
        with log:
            self.procs.append(
                subprocess.Popen(
                    [_which(name), *args],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                    start_new_session=True,
                )
            )

    def _wait(self, cond: object, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not cond():  # type: ignore[operator]
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            assert not dead, f"{dead} exited while waiting for {what}\n{self.logs()}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}\n{self.logs()}"
            time.sleep(0.1)

    def _slurm_conf(self) -> str:
        d, host = self.dir, socket.gethostname().split(".")[0]
        return f"""\
# written by tests/slurm_cluster.py: one node on loopback, everything under {d}
ClusterName=tbssq
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.socket}
SlurmUser={_user()}
SlurmdUser={_user()}
StateSaveLocation={d / "state"}
SlurmdSpoolDir={d / "spool"}
SlurmctldPidFile={d / "slurmctld.pid"}
SlurmdPidFile={d / "slurmd.pid"}
SlurmctldLogFile={d / "slurmctld.log"}
SlurmdLogFile={d / "slurmd.log"}
PlugStackConfig={d / "plugstack.conf"}
ProctrackType=proctrack/{self.proctrack}
TaskPlugin=task/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
KillWait={self.kill_wait}
MinJobAge=600
ReturnToService=2
SlurmctldDebug=info
SlurmdDebug=debug
# the node as configured here, whatever this machine has
SlurmdParameters=config_overrides
NodeName={self.node} NodeAddr=127.0.0.1 CPUs=4 RealMemory=16000 State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


@contextlib.contextmanager
def slurm_cluster(directory: Path, proctrack: str) -> Iterator[SlurmCluster]:
    cluster = SlurmCluster(directory, proctrack)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
