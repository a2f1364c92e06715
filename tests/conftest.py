"""Real parts: a redis-server started by the suite, real `tbss-queue worker` processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tbss_queue.config import Settings
from tbss_queue.execution.procs import TAG_VAR, kill_tagged
from tbss_queue.redis_server import RedisServer, find_redis_server, free_port

REPO = Path(__file__).resolve().parent.parent
# every process the suite starts (workers, `run`, the demo's stand-in fsl_reg) imports this
# checkout's tbss_queue, whatever version pip last installed
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the session on a free loopback port; always stopped."""
    try:
        find_redis_server()
    except Exception as exc:  # fail, don't skip: the suite is meaningless without Redis
        pytest.fail(f"{exc}")
    server = RedisServer(tmp_path_factory.mktemp("redis"), port=free_port(), persistent=False)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """The session server's URL, with an empty database before and after the test."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield redis_server.url
    client.flushall()
    client.close()


@pytest.fixture
def settings(redis_url: str) -> Settings:
    # short heartbeats keep the fault-injection tests quick; production defaults are larger
    return Settings.resolve(env={}, broker=redis_url, heartbeat=1.0, lost_after=4.0)


@pytest.fixture
def run_tag() -> str:
    return uuid.uuid4().hex


def settings_env(settings: Settings, tag: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "TBSS_QUEUE_BROKER": settings.broker,
            "TBSS_QUEUE_HEARTBEAT": str(settings.heartbeat),
            "TBSS_QUEUE_LOST_AFTER": str(settings.lost_after),
            "TBSS_QUEUE_CRASH_LIMIT": str(settings.crash_limit),
            "TBSS_QUEUE_KEEP": str(settings.keep),
            TAG_VAR: tag,
            "PYTHONUNBUFFERED": "1",
        }
    )
    if settings.uses_sentinel:
        env["TBSS_QUEUE_SENTINEL_MASTER"] = settings.sentinel_master
        if settings.sentinel_password:
            env["TBSS_QUEUE_SENTINEL_PASSWORD"] = settings.sentinel_password
    return env


class Worker:
    """A `tbss-queue worker` subprocess in its own process group."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.name, self.proc, self.log = name, proc, log

    def wait_ready(self, timeout: float = 30.0) -> Worker:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log.exists() and " ready." in self.log.read_text(errors="replace"):
                return self
            if self.proc.poll() is not None:
                raise AssertionError(f"worker {self.name} exited:\n{self.log.read_text()}")
            time.sleep(0.1)
        raise AssertionError(f"worker {self.name} not ready:\n{self.log.read_text()}")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.signal(signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def workers(settings: Settings, tmp_path: Path, run_tag: str) -> Iterator[Callable[..., Worker]]:
    """Factory: start('w1', concurrency=2) launches a real worker node; all killed afterwards."""
    started: list[Worker] = []

    def start(
        name: str,
        concurrency: int = 2,
        *extra: str,
        ready: bool = True,
        env: dict[str, str] | None = None,
        wrap: tuple[str, ...] = (),
    ) -> Worker:
        """wrap: a command prefix (e.g. `ip netns exec NS`) that then execs the worker."""
        log = tmp_path / f"worker-{name}-{len(started)}.log"
        cmd = [
            *wrap,
            sys.executable,
            "-m",
            "tbss_queue",
            "worker",
            "--name",
            name,
            "--concurrency",
            str(concurrency),
            # tests of other behaviour run python stand-ins; policy tests pass their own flags
            *([] if any(a.startswith(("--allow", "--root")) for a in extra) else ["--allow-any"]),
            *extra,
        ]
        with open(log, "wb") as fh:
            proc = subprocess.Popen(
                cmd,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env={**settings_env(settings, run_tag), **(env or {})},
                start_new_session=True,
                cwd=tmp_path,
            )
        w = Worker(name, proc, log)
        started.append(w)
        return w.wait_ready() if ready else w

    yield start
    for w in started:
        w.stop()
    kill_tagged(run_tag, grace=1.0)


def tbss_queue(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user would, in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "tbss_queue", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=cwd,
    )


def write_commands(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path
