"""A huge commands file: submit shows how far it is, holds a chunk at a time, and ends with the
id of a whole batch or leaves nothing, even when the broker dies under it.

Real redis-server (with AOF, killed with SIGKILL and restarted), `tbss-queue submit` as a
user runs it (a subprocess, stderr not a terminal).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import redis

from tbss_queue import api
from tbss_queue.config import Settings
from tbss_queue.queue.keys import BATCHES
from tbss_queue.redis_server import RedisServer, free_port
from tbss_queue.views.progress import PROGRESS_LINES_FROM

from .conftest import write_commands

N = PROGRESS_LINES_FROM + 10_000


def big_file(tmp_path: Path) -> Path:
    return write_commands(tmp_path / "big.commands", [f"true {i}" for i in range(N)])


def test_a_huge_file_shows_its_progress_and_ends_with_the_id_of_the_whole_batch(
    tmp_path: Path, settings: Settings
) -> None:
    env = {"TBSS_QUEUE_BROKER": settings.broker, "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "tbss_queue", "submit", str(big_file(tmp_path))],
        capture_output=True,
        text=True,
        env={**env, "PYTHONPATH": str(Path(__file__).parent.parent)},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    # progress a log can follow: a line at each tenth, in order
    shown = [ln for ln in done.stderr.splitlines() if ln.startswith("staged ")]
    assert shown[0].startswith("staged ") and shown[0].endswith("(10%)")
    assert shown[-1] == f"staged {N:,} of {N:,} commands (100%)"
    assert len(shown) == 10
    # and the id of a batch that holds every command, each with its message
    batch = done.stdout.strip()
    status = api.status(batch, settings=settings)
    assert (status.total, status.queued) == (N, N)
    assert redis.Redis.from_url(settings.broker).llen(settings.queue) == N


def test_a_broker_killed_while_a_huge_file_is_staged_leaves_nothing_visible(
    tmp_path: Path,
) -> None:
    # Given a broker that keeps its data (AOF), killed while submit is half-way
    port = free_port()
    server = RedisServer(tmp_path / "redis", port=port, persistent=True).start()
    try:
        env = {
            "TBSS_QUEUE_BROKER": server.url,
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(Path(__file__).parent.parent),
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "tbss_queue", "submit", str(big_file(tmp_path))],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert proc.stderr is not None
        seen = ""
        while "(50%)" not in seen:
            line = proc.stderr.readline()
            assert line, f"submit ended before half-way: {seen}"
            seen += line
        server.kill()
        out, rest = proc.communicate(timeout=120)
        # Then submit fails in one line, exit 3, with no batch id on stdout
        assert proc.returncode == 3, seen + rest
        assert out.strip() == ""
        errors = [ln for ln in rest.splitlines() if ln.startswith("tbss-queue: error")]
        assert len(errors) == 1 and "Traceback" not in rest
        # And once the broker is back, no batch is visible and no message is queued
        server = RedisServer(tmp_path / "redis", port=port, persistent=True).start()
        client = redis.Redis.from_url(server.url)
        deadline = time.monotonic() + 30
        while client.info("persistence").get("loading") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.zcard(BATCHES) == 0
        assert client.llen("tbss-queue") == 0
        settings = Settings.resolve(env={}, broker=server.url)
        assert api.list_batches(settings=settings) == []
    finally:
        server.stop()
