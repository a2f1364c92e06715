"""Fault injection on real redis-server and worker processes: nothing lost, nothing run twice.

Every command appends its id to a log when it completes; each test ends by counting them.
"""

from __future__ import annotations

import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from tbss_queue import api
from tbss_queue.config import Settings
from tbss_queue.redis_server import RedisServer, free_port

from .conftest import Worker, settings_env, tbss_queue, write_commands
from .faults import JOB, gone, job, ran, wait_until

pytestmark = pytest.mark.slow


def test_sigkill_of_a_worker_node_mid_task_loses_nothing_and_runs_nothing_twice(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker]
) -> None:
    # Given two nodes running 12 two-second commands
    log = tmp_path / "log"
    w1, _ = workers("w1"), workers("w2")
    cmds = write_commands(tmp_path / "cmds", [job(i, log, "--sleep", "2") for i in range(12)])
    batch = api.submit(cmds, settings=settings)
    wait_until(
        lambda: any(
            n.node.startswith("w1@") and n.running
            for n in api.status(batch.id, settings=settings).nodes
        ),
        what="w1 running a task",
    )
    # When w1 is killed with SIGKILL (its main process and pool at once)
    w1.signal(signal.SIGKILL)
    final = api.wait(batch.id, settings=settings, timeout=120)
    # Then every command completed exactly once and the states add up
    assert ran(log) == Counter(str(i) for i in range(12))
    assert (final.succeeded, final.failed, final.queued, final.running) == (12, 0, 0, 0)
    assert sum(n.succeeded for n in final.nodes) == 12


def test_redis_restart_mid_batch_loses_nothing(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker]
) -> None:
    # Given a persistent redis-server (AOF, as shipped) and two nodes working on 20 commands
    port = free_port()
    server = RedisServer(tmp_path / "redis", port=port, persistent=True).start()
    try:
        local = settings.with_(broker=server.url)
        env = {"TBSS_QUEUE_BROKER": server.url}
        workers("w1", env=env)
        workers("w2", env=env)
        log = tmp_path / "log"
        cmds = write_commands(tmp_path / "cmds", [job(i, log, "--sleep", "0.5") for i in range(20)])
        batch = api.submit(cmds, settings=local)
        wait_until(lambda: len(ran(log)) >= 4, what="first commands")
        # When redis-server is killed and restarted on the same port and data directory
        server.kill()
        time.sleep(2)
        server = RedisServer(tmp_path / "redis", port=port, persistent=True).start()
        try:
            final = api.wait(batch.id, settings=local, timeout=90)
        except TimeoutError:
            import redis as r

            c = r.Redis.from_url(server.url, decode_responses=True)
            stuck = [t for t in api.tasks(batch.id, settings=local) if t.state != "succeeded"]
            raise AssertionError(
                f"stuck: {stuck}\nrunning: {c.hgetall('tbssq:running')}\n"
                f"unacked: {c.hkeys('unacked')} {c.zrange('unacked_index', 0, -1, withscores=True)}"
                f"\nqueue: {c.llen('tbss-queue')} now {time.time()}"
                f"\nattempts: {c.hgetall('tbssq:b:' + batch.id + ':attempts')}"
            ) from None
        # Then the batch completes with every command run exactly once
        assert ran(log) == Counter(str(i) for i in range(20))
        assert (final.succeeded, final.failed, final.queued, final.running) == (20, 0, 0, 0)
    finally:
        server.stop()


def test_a_command_that_kills_its_worker_fails_as_lost_after_the_crash_limit(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker]
) -> None:
    log = tmp_path / "log"
    workers("w1")
    workers("w2")
    lines = [job(i, log) for i in range(6)] + [job("killer", log, "--kill-parent", "--sleep", "3")]
    batch = api.submit(write_commands(tmp_path / "cmds", lines), settings=settings)
    final = api.wait(batch.id, settings=settings, timeout=180)
    assert ran(log) == Counter(str(i) for i in range(6))
    assert (final.succeeded, final.failed, final.queued, final.running) == (6, 1, 0, 0)
    [lost] = api.failures(batch.id, settings=settings)
    assert lost.cause == "lost" and "crash limit" in lost.message
    assert f"{settings.crash_limit} times" in lost.message


def test_resubmitting_a_reordered_file_with_new_lines_runs_only_unfinished_and_new(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], run_tag: str
) -> None:
    # Given a batch where 5 commands succeeded and 5 failed (their input was missing)
    log, flag = tmp_path / "log", tmp_path / "input-ready"
    workers("w1")
    lines = [job(i, log) for i in range(5)] + [
        job(i, log, "--fail-unless", str(flag)) for i in range(5, 10)
    ]
    cmds = write_commands(tmp_path / "cmds", lines)
    first = api.wait(api.submit(cmds, settings=settings).id, settings=settings, timeout=60)
    assert (first.succeeded, first.failed) == (5, 5)
    # When the cause is fixed and the same file is submitted again, reordered, 5 lines added
    flag.touch()
    write_commands(cmds, list(reversed(lines)) + [job(i, log) for i in range(10, 15)])
    again = api.submit(cmds, settings=settings)
    assert again.id == first.batch and again.queued == 10
    final = api.wait(again.id, settings=settings, timeout=60)
    # Then only the 5 unfinished and the 5 new commands ran: each id exactly once
    assert ran(log) == Counter(str(i) for i in range(15))
    assert (final.total, final.succeeded, final.failed) == (15, 15, 0)


def test_cancel_kills_running_commands_and_their_children(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], run_tag: str
) -> None:
    pidfile, log = tmp_path / "pids", tmp_path / "log"
    workers("w1", 2)
    lines = [job(i, log, "--child", "--sleep", "600", "--pidfile", str(pidfile)) for i in range(4)]
    batch = api.submit(write_commands(tmp_path / "cmds", lines), settings=settings)
    wait_until(
        lambda: pidfile.exists() and len(pidfile.read_text().splitlines()) == 2,
        what="two commands running",
    )
    pids = [int(p) for p in pidfile.read_text().split()]
    res = tbss_queue("cancel", batch.id, "--yes", env=settings_env(settings, run_tag))
    assert res.returncode == 0, res.stderr
    assert gone(pids), "a command or its child survived cancel"
    final = api.status(batch.id, settings=settings)
    assert (final.cancelled, final.queued, final.running, final.done) == (4, 0, 0, True)
    time.sleep(1)
    assert len(pidfile.read_text().splitlines()) == 2, "a cancelled command started later"
    assert not log.exists()


def test_time_limit_ends_a_command_as_timeout_with_its_children(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker]
) -> None:
    pidfile = tmp_path / "pids"
    workers("w1")
    cmds = write_commands(
        tmp_path / "cmds", [f"{sys.executable} {JOB} slow --child --sleep 600 --pidfile {pidfile}"]
    )
    batch = api.submit(cmds, time_limit=2, settings=settings)
    final = api.wait(batch.id, settings=settings, timeout=60)
    assert (final.failed, final.succeeded) == (1, 0)
    [failed] = api.failures(batch.id, settings=settings)
    assert failed.cause == "timeout" and "time limit of 2 s" in failed.message
    assert gone([int(p) for p in pidfile.read_text().split()])


def test_failures_written_out_and_resubmitted_complete_the_study(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], run_tag: str
) -> None:
    log, flag = tmp_path / "log", tmp_path / "fixed"
    workers("w1")
    lines = [job(i, log) for i in range(4)] + [
        job(i, log, "--fail-unless", str(flag)) for i in range(4, 6)
    ]
    env = settings_env(settings, run_tag)
    cmds = write_commands(tmp_path / "cmds", lines)
    assert tbss_queue("submit", str(cmds), "--wait", env=env).returncode == 1
    res = tbss_queue("failures", "--write", str(tmp_path / "failed.cmds"), env=env)
    assert res.returncode == 0, res.stderr
    assert len((tmp_path / "failed.cmds").read_text().splitlines()) == 2
    flag.touch()
    res = tbss_queue("submit", str(tmp_path / "failed.cmds"), "--wait", env=env)
    assert res.returncode == 0, res.stderr
    assert ran(log) == Counter(str(i) for i in range(6))


def test_retry_requeues_exactly_the_failed_commands(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], run_tag: str
) -> None:
    log, flag = tmp_path / "log", tmp_path / "fixed"
    workers("w1")
    lines = [job(i, log) for i in range(3)] + [job("x", log, "--fail-unless", str(flag))]
    env = settings_env(settings, run_tag)
    assert (
        tbss_queue(
            "submit", str(write_commands(tmp_path / "c", lines)), "--wait", env=env
        ).returncode
        == 1
    )
    flag.touch()
    res = tbss_queue("retry", "--wait", env=env)
    assert res.returncode == 0, res.stderr
    assert "1 command queued again" in res.stderr
    assert ran(log) == Counter(["0", "1", "2", "x"])


def test_retries_option_runs_a_failing_command_again(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker]
) -> None:
    counter = tmp_path / "attempts"
    workers("w1")
    script = (
        f"import pathlib,sys; p=pathlib.Path({str(counter)!r}); "
        "n=len(p.read_text()) if p.exists() else 0; p.write_text('x'*(n+1)); "
        "sys.exit(0 if n >= 2 else 1)"
    )
    cmds = write_commands(tmp_path / "c", [f'{sys.executable} -c "{script}"'])
    batch = api.submit(cmds, retries=2, settings=settings)
    final = api.wait(batch.id, settings=settings, timeout=60)
    assert (final.succeeded, final.failed) == (1, 0)
    assert counter.read_text() == "xxx"
