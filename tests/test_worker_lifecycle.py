"""Stopping workers without losing or failing work: --stop-after, SIGTERM with a grace period."""

from __future__ import annotations

import datetime as dt
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from tbss_queue import api
from tbss_queue.config import Settings
from tbss_queue.errors import ConfigError
from tbss_queue.models import Batch
from tbss_queue.redis_server import RedisServer, free_port
from tbss_queue.worker import SHUTDOWN_SLACK, parse_duration, seconds_until

from .conftest import Worker, write_commands
from .test_reliability import gone, job, ran, wait_until


def test_durations_and_times() -> None:
    assert parse_duration("90") == 90 and parse_duration("10m") == 600
    assert parse_duration("1h30m") == 5400 and parse_duration("3s") == 3
    with pytest.raises(ConfigError, match="--stop-after 'soon'"):
        parse_duration("soon")
    now = dt.datetime(2026, 1, 1, 22, 0)
    assert seconds_until("23:30", now) == 5400
    assert seconds_until("06:00", now) == 8 * 3600  # tomorrow


@pytest.mark.slow
def test_stop_after_finishes_the_running_command_takes_no_new_one_and_exits_0(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker]
) -> None:
    log = tmp_path / "log"
    w1 = workers("w1", 1, "--stop-after", "3s")
    batch = api.submit(
        write_commands(tmp_path / "c", [job(i, log, "--sleep", "6") for i in range(3)]),
        settings=settings,
    )
    assert w1.proc.wait(30) == 0
    assert ran(log) == Counter(["0"])
    assert api.status(batch.id, settings=settings).queued == 2
    workers("w2", 2)
    final = api.wait(batch.id, settings=settings, timeout=60)
    assert ran(log) == Counter(["0", "1", "2"]) and final.failed == 0
    by_node = {n.node.split("@")[0]: n.succeeded for n in final.nodes}
    assert by_node == {"w1": 1, "w2": 2}


def running(tmp_path: Path, settings: Settings, line: str) -> Batch:
    """Submit one command and wait until a worker runs it."""
    batch = api.submit(write_commands(tmp_path / "c", [line]), settings=settings)
    wait_until(lambda: api.status(batch.id, settings=settings).running == 1, what="running")
    return batch


@pytest.mark.slow
def test_sigterm_hands_a_running_command_back_after_the_grace_period(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker]
) -> None:
    log = tmp_path / "log"
    w1 = workers("w1", 1, "--grace", "2")
    batch = running(tmp_path, settings, job("long", log, "--sleep", "10"))
    w1.proc.send_signal(signal.SIGTERM)  # the main process only, as systemd or Slurm would
    assert w1.proc.wait(30) == 0
    st = api.status(batch.id, settings=settings)
    assert (st.failed, st.succeeded, st.running, st.queued) == (0, 0, 0, 1)
    workers("w2")
    final = api.wait(batch.id, settings=settings, timeout=60)
    assert (final.succeeded, final.failed) == (1, 0)
    assert ran(log) == Counter(["long"])
    assert [n.node.split("@")[0] for n in final.nodes if n.succeeded] == ["w2"]


@pytest.mark.slow
def test_sigterm_returns_as_soon_as_the_running_command_ends(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker]
) -> None:
    # Given a node with a 10-minute grace period, running a 3-second command
    log = tmp_path / "log"
    w1 = workers("w1", 1, "--grace", "600")
    batch = running(tmp_path, settings, job("short", log, "--sleep", "3"))
    # When it is told to stop
    w1.proc.send_signal(signal.SIGTERM)
    # Then it lets the command finish and exits then, not at the end of the grace period
    assert w1.proc.wait(60) == 0
    assert ran(log) == Counter(["short"])
    assert api.status(batch.id, settings=settings).succeeded == 1


@pytest.mark.slow
def test_a_worker_told_to_stop_exits_even_when_redis_is_gone(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker]
) -> None:
    # Given a node on its own Redis, running a long command
    server = RedisServer(tmp_path / "redis", port=free_port(), persistent=False).start()
    try:
        w1 = workers("w1", 1, "--grace", "1", env={"TBSS_QUEUE_BROKER": server.url})
        pidfile = tmp_path / "pids"
        cmd = job("long", tmp_path / "log", "--sleep", "600", "--pidfile", str(pidfile))
        api.submit(
            write_commands(tmp_path / "c", [cmd]), settings=settings.with_(broker=server.url)
        )
        wait_until(pidfile.exists, what="the command to start")
        # When Redis goes away (for longer than Celery's 2-second worker heartbeat) and then
        # the node is told to stop
        server.kill()
        time.sleep(4)
        w1.proc.send_signal(signal.SIGTERM)
        # Then it exits within its grace period plus the shutdown slack, the command with it
        # (its task is recovered from Redis by the other nodes, as after a crash)
        w1.proc.wait(1 + SHUTDOWN_SLACK + 10)
        assert gone([int(p) for p in pidfile.read_text().split()])
    finally:
        server.stop()
