"""A broker outage as a person sees it: every watcher says so and carries on; a worker says
one line when the broker goes and one when it is back (issue 29, point 4)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tbss_queue import api
from tbss_queue.config import Settings
from tbss_queue.redis_server import RedisServer, free_port

from .conftest import Worker, write_commands
from .faults import job, ran, wait_until
from .test_watch import Tmux

pytestmark = pytest.mark.slow

UNREACHABLE = r"broker unreachable since \d\d:\d\d:\d\d, retrying"


def test_a_broker_outage_is_said_plainly_by_watchers_and_workers(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], run_tag: str
) -> None:
    # Given a private persistent redis-server, a worker, and a batch of 12 half-second commands
    port = free_port()
    server = RedisServer(tmp_path / "redis", port=port, persistent=True).start()
    try:
        local = settings.with_(broker=server.url)
        w1 = workers("w1", 2, env={"TBSS_QUEUE_BROKER": server.url})
        log = tmp_path / "log"
        cmds = [job(i, log, "--sleep", "0.5") for i in range(36)]
        first = api.submit(write_commands(tmp_path / "a", cmds[:12]), settings=local)
        write_commands(tmp_path / "b", cmds[12:24])
        write_commands(tmp_path / "c", cmds[24:])
        # watched by `status --watch`, `submit --wait` (of a second file) and `run` (a third,
        # sent to the configured broker)
        with (
            Tmux(local, run_tag, f"status --watch {first.id}") as watcher,
            Tmux(local, run_tag, f"submit --wait {tmp_path / 'b'}") as waiter,
            Tmux(local, run_tag, f"run {tmp_path / 'c'}") as runner,
        ):
            watcher.wait_for(r"finished \(")
            waiter.wait_for(r"batch \w+ .*/12")
            runner.wait_for(r"batch \w+ .*/12")
            wait_until(lambda: len(ran(log)) >= 2, what="first commands")
            # When Redis stops until every view has said so, then comes back
            server.kill()
            down = watcher.wait_for(UNREACHABLE)
            assert "Traceback" not in down and "Error" not in down, down
            assert re.search(UNREACHABLE, waiter.wait_for(UNREACHABLE))
            assert re.search(UNREACHABLE, runner.wait_for(UNREACHABLE))
            wait_until(lambda: "broker unreachable" in w1.log.read_text(), what="the worker's line")
            time.sleep(3)  # an outage of several heartbeats: each one must not say it again
            server = RedisServer(tmp_path / "redis", port=port, persistent=True).start()
            # Then the watchers carry on to the end, with the outage line gone
            screen = watcher.wait_for(r"12/12 finished", timeout=90)
            assert not re.search(UNREACHABLE, screen), screen
            end = waiter.wait_for(r"batch \w+: 12 succeeded, 0 failed", timeout=90)
            assert "broker back after" in end, end
            end = runner.wait_for(r"batch \w+: 12 succeeded, 0 failed", timeout=90)
            assert "broker back after" in end, end
            watcher.keys("C-c")
        # and the worker said one line when the broker went and one when it came back
        wait_until(lambda: "broker back after" in w1.log.read_text(), what="the worker's back")
        text = w1.log.read_text()
        assert text.count("broker unreachable") == 1, text
        assert text.count("broker back after") == 1, text
        assert "node health check failed" not in text and "lost-task check failed" not in text
        assert ran(log).total() == 36
    finally:
        server.stop()
