"""Each system under test runs a list of command lines on `nodes` x `slots` and reports the
wall time from handing the list over to the last command finished. Workers are started and
warmed up before the clock starts, as a lab's long-lived workers would be."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil
import redis

from tbss_queue import api
from tbss_queue.config import Settings
from tbss_queue.queue.app import make_app
from tbss_queue.redis_server import RedisServer, free_port

REPO = Path(__file__).resolve().parent.parent


def run_line(line: str) -> int:
    """What every Python-scheduled peer runs per command: the line, without a shell."""
    return subprocess.run(shlex.split(line), check=False).returncode


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as fh:
        return subprocess.Popen(
            args, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )


def _wait_log(log: Path, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in (log.read_text(errors="replace") if log.exists() else ""):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{log} never said {text!r}")
        time.sleep(0.1)


def tree_rss(pids: Sequence[int]) -> int:
    """Resident memory of processes and all their children, in bytes."""
    total = 0
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            for p in [proc, *proc.children(recursive=True)]:
                total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


class System:
    name = "?"
    pids: list[int]

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.pids = []

    def start(self, nodes: int, slots: int) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def run(self, lines: Sequence[str]) -> float:  # pragma: no cover - interface
        raise NotImplementedError

    def stop(self) -> None:
        for pid in self.pids:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.pids = []


class TbssQueue(System):
    name = "tbss-queue"

    def __init__(self, workdir: Path, server: RedisServer) -> None:
        super().__init__(workdir)
        self.server = server
        self.settings = Settings.resolve(env={}, broker=server.url)
        self.runs = 0

    def env(self) -> dict[str, str]:
        return {**os.environ, "TBSS_QUEUE_BROKER": self.server.url, "PYTHONPATH": str(REPO)}

    def start(self, nodes: int, slots: int, first: int = 0) -> None:
        for n in range(first, first + nodes):
            log = self.workdir / f"tbssq-w{n}.log"
            cmd = [sys.executable, "-m", "tbss_queue", "worker", "--name", f"w{n}", "-c"]
            proc = _spawn([*cmd, str(slots), "--allow-any"], self.env(), log)
            self.pids.append(proc.pid)
        for n in range(first, first + nodes):
            _wait_log(self.workdir / f"tbssq-w{n}.log", " ready.")

    def run(self, lines: Sequence[str]) -> float:
        self.runs += 1
        path = self.workdir / f"tbssq-{self.runs}.commands"
        path.write_text("".join(f"{line}\n" for line in lines))
        start = time.perf_counter()
        batch = api.submit(path, cwd=self.workdir, settings=self.settings)
        while not api.status(batch.id, settings=self.settings).done:
            time.sleep(0.02)
        return time.perf_counter() - start


class PlainCelery(System):
    name = "plain Celery"

    def __init__(self, workdir: Path, server: RedisServer) -> None:
        super().__init__(workdir)
        self.server = server

    def env(self) -> dict[str, str]:
        return {**os.environ, "PLAIN_CELERY_BROKER": self.server.url, "PYTHONPATH": str(REPO)}

    def start(self, nodes: int, slots: int, first: int = 0) -> None:
        os.environ["PLAIN_CELERY_BROKER"] = self.server.url
        for n in range(first, first + nodes):
            log = self.workdir / f"celery-w{n}.log"
            cmd = [sys.executable, "-m", "celery", "-A", "benchmarks.plain_celery", "worker"]
            args = [*cmd, "-c", str(slots), "-n", f"c{n}@%h", "-l", "info"]
            proc = _spawn(args, self.env(), log)
            self.pids.append(proc.pid)
        for n in range(first, first + nodes):
            _wait_log(self.workdir / f"celery-w{n}.log", " ready.")

    def run(self, lines: Sequence[str]) -> float:
        from benchmarks.plain_celery import make_app

        task = make_app(self.server.url).tasks["plain.run"]
        start = time.perf_counter()
        results = [task.apply_async((line,)) for line in lines]
        for r in results:
            r.get(timeout=3600)
        return time.perf_counter() - start


class CeleryFloor(System):
    """benchmarks/celery_floor.py on tbss-queue's pool (prefork, one node of `slots`)."""

    name = "Celery floor (prefork)"

    def __init__(self, workdir: Path, server: RedisServer) -> None:
        super().__init__(workdir)
        self.server = server
        self.tally = workdir / "celery-floor.tally"
        self.procs: list[subprocess.Popen[bytes]] = []

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "CELERY_FLOOR_BROKER": self.server.url,
            "CELERY_FLOOR_TALLY": str(self.tally),
            "PYTHONPATH": str(REPO),
        }

    def _worker(self, name: str, pool: str, slots: int) -> None:
        log = self.workdir / f"floor-{name}.log"
        cmd = [sys.executable, "-m", "celery", "-A", "benchmarks.celery_floor", "worker"]
        args = [*cmd, "-P", pool, "-c", str(slots), "-n", f"{name}@%h", "-l", "info"]
        proc = _spawn([*args, "--without-mingle", "--without-gossip"], self.env(), log)
        self.pids.append(proc.pid)
        self.procs.append(proc)
        _wait_log(log, " ready.")

    def start(self, nodes: int, slots: int) -> None:
        for n in range(nodes):
            self._worker(f"f{n}", "prefork", slots)

    def run(self, lines: Sequence[str]) -> float:
        from benchmarks.celery_floor import TASK

        app = make_app(Settings.resolve(env={}, broker=self.server.url))
        self.tally.write_bytes(b"")
        start = time.perf_counter()
        with app.producer_or_acquire() as producer:
            for line in lines:
                app.send_task(TASK, (shlex.split(line),), producer=producer)
        while self.tally.stat().st_size < len(lines):
            if any(proc.poll() is not None for proc in self.procs):
                raise RuntimeError(f"a {self.name} worker died: see {self.workdir}/floor-*.log")
            time.sleep(0.02)
        return time.perf_counter() - start

    def stop(self) -> None:
        super().stop()
        for proc in self.procs:
            proc.wait()
        self.procs = []


class CelerySoloFloor(CeleryFloor):
    """The same task, each slot a consumer of its own with Celery's solo pool: no pool
    process, no pipe between the consumer and the task."""

    name = "Celery floor (solo per slot)"

    def start(self, nodes: int, slots: int) -> None:
        for n in range(nodes):
            for s in range(slots):
                self._worker(f"f{n}s{s}", "solo", 1)


class Xargs(System):
    """GNU xargs -P on one machine: the floor for per-command overhead (no queue at all)."""

    name = "xargs -P"

    def start(self, nodes: int, slots: int) -> None:
        self.parallel = nodes * slots

    def run(self, lines: Sequence[str]) -> float:
        path = self.workdir / "xargs.commands"
        path.write_text("".join(f"{line}\n" for line in lines))
        start = time.perf_counter()
        with open(path) as fh:
            # `env` runs each line's program itself (xargs alone would echo the lines)
            subprocess.run(
                ["xargs", "-P", str(self.parallel), "-L", "1", "env"], stdin=fh, check=True
            )
        return time.perf_counter() - start


class Dask(System):
    name = "dask.distributed"

    def start(self, nodes: int, slots: int) -> None:
        from dask.distributed import Client, LocalCluster

        self.cluster = LocalCluster(
            n_workers=nodes,
            threads_per_worker=slots,
            processes=True,
            dashboard_address=None,
            silence_logs=40,
        )
        self.client = Client(self.cluster)

    def run(self, lines: Sequence[str]) -> float:
        start = time.perf_counter()
        futures = self.client.map(run_line, list(lines), pure=False)
        self.client.gather(futures)
        return time.perf_counter() - start

    def stop(self) -> None:
        self.client.close()
        self.cluster.close()


class IPyParallel(System):
    """The original recipe: an ipcluster and a load-balanced view's map_async."""

    name = "ipyparallel"

    def start(self, nodes: int, slots: int) -> None:
        import ipyparallel as ipp

        self.cluster = ipp.Cluster(n=nodes * slots, log_level=40)
        self.rc = self.cluster.start_and_connect_sync()
        self.rc.wait_for_engines(nodes * slots, timeout=120)

    def run(self, lines: Sequence[str]) -> float:
        view = self.rc.load_balanced_view()
        start = time.perf_counter()
        view.map_async(run_line, list(lines)).get()
        return time.perf_counter() - start

    def stop(self) -> None:
        self.cluster.stop_cluster_sync()


class GnuParallel(System):
    """GNU parallel on one machine, like xargs: `parallel -j SLOTS` reading the lines.

    GNU parallel has no way to run a command without a shell: every job is
    `$PARALLEL_SHELL -c LINE` (-q only quotes the command for that shell). The job is
    `exec LINE` in /bin/sh, so the shell replaces itself with the line's program: two execs
    per command, as xargs's `env` and tbss-queue's setpriv make (without `exec`, `true` would
    be the shell's builtin and nothing would be executed). -r skips empty lines; -u passes the
    output straight through, as xargs does (by default parallel holds each job's output in
    temporary files, to print it whole: more work per command)."""

    name = "GNU parallel"

    @staticmethod
    def installed() -> bool:
        """Debian's `parallel` (moreutils ships another program of that name)."""
        exe = shutil.which("parallel")
        if exe is None:
            return False
        try:
            out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return False
        return out.stdout.startswith("GNU parallel")

    def start(self, nodes: int, slots: int) -> None:
        self.parallel = nodes * slots

    def run(self, lines: Sequence[str]) -> float:
        path = self.workdir / "parallel.commands"
        path.write_text("".join(f"{line}\n" for line in lines))
        env = {**os.environ, "PARALLEL_SHELL": "/bin/sh"}
        cmd = ["parallel", "-j", str(self.parallel), "-r", "-u", "exec {=uq=}"]
        start = time.perf_counter()
        with open(path) as fh:
            subprocess.run(cmd, stdin=fh, env=env, check=True)
        return time.perf_counter() - start


class HyperQueue(System):
    """HyperQueue's Python API (PyPI `hyperqueue`): its LocalCluster, a server and one worker
    of `slots` cores per node, each line a `job.program(argv)` task (no shell; output discarded,
    as the other peers do: HQ's default would write two files per task).

    The wheel holds the server and workers (no `hq` binary), as threads of the process that
    starts them. That process is benchmarks/hq_host.py, not this one: HQ forks a full copy of
    its process per task, and this one is large once the other peers have been imported."""

    name = "HyperQueue"

    def start(self, nodes: int, slots: int) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        args = [sys.executable, "-m", "benchmarks.hq_host", str(nodes), str(slots)]
        with open(self.workdir / "hq-host.log", "ab") as log:
            self.proc = subprocess.Popen(
                [*args, str(self.workdir)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
                text=True,
                start_new_session=True,
            )
        self.pids.append(self.proc.pid)
        self.runs = 0
        self._answer("ready")

    def _answer(self, expected: str) -> None:
        assert self.proc.stdout is not None
        answer = self.proc.stdout.readline().strip()
        if answer != expected:
            log = (self.workdir / "hq-host.log").read_text(errors="replace")[-500:]
            raise RuntimeError(f"HyperQueue host said {answer!r}, not {expected!r}: {log}")

    def run(self, lines: Sequence[str]) -> float:
        assert self.proc.stdin is not None
        self.runs += 1
        path = self.workdir / f"hq-{self.runs}.commands"
        path.write_text("".join(f"{line}\n" for line in lines))
        start = time.perf_counter()
        self.proc.stdin.write(f"{path}\n")
        self.proc.stdin.flush()
        assert self.proc.stdout is not None
        answer = self.proc.stdout.readline().strip()
        took = time.perf_counter() - start
        if answer.startswith("failed "):
            raise RuntimeError(f"HyperQueue: {answer.split()[1]} of {len(lines)} tasks failed")
        if answer != "ok":
            raise RuntimeError(f"HyperQueue host said {answer!r}: see {self.workdir}/hq-host.log")
        return took

    def stop(self) -> None:
        proc: subprocess.Popen[str] | None = getattr(self, "proc", None)
        if proc is not None:
            with contextlib.suppress(OSError, ValueError):
                if proc.stdin is not None:
                    proc.stdin.close()  # end of input: the host stops its cluster
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
            if proc.stdout is not None:
                proc.stdout.close()
        super().stop()


PEERS: list[tuple[str, type[System], str]] = [
    ("ipyparallel", IPyParallel, "pip install -e '.[bench]'"),
    ("distributed", Dask, "pip install -e '.[bench]'"),
    ("hyperqueue", HyperQueue, "pip install -e '.[bench]'"),
]
"""The Python peers: importable module, system, how to install it."""


def installed_peers() -> list[type[System]]:
    """xargs, and every peer that is installed; one that is not is left out, with a note."""
    peers: list[type[System]] = [Xargs]
    if GnuParallel.installed():
        peers.append(GnuParallel)
    else:
        print("(peer GNU parallel not installed: apt-get install parallel)", file=sys.stderr)
    for module, cls, how in PEERS:
        try:
            __import__(module)
            peers.append(cls)
        except ImportError:
            print(f"(peer {cls.name} not installed: {how})", file=sys.stderr)
    return peers


def fresh_redis(workdir: Path) -> RedisServer:
    return RedisServer(
        Path(tempfile.mkdtemp(dir=workdir, prefix="redis-")), port=free_port(), persistent=False
    ).start()


def redis_client(server: RedisServer) -> Any:
    return redis.Redis.from_url(server.url)
