"""A runner's margin (LOST_AFTER - 2 x HEARTBEAT) and the nodes that cannot keep it.

A runner kills its command once it has gone its margin without a renewal, so that no second
copy can start beside it. Settings that leave no room for a renewal would kill every healthy
command at its first renewal, for ever; a node whose runners keep renewing late is the node's
fault, not its commands'. Real redis-server, real `tbss-queue worker` processes.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from tbss_queue import api
from tbss_queue.config import Settings

from .conftest import Worker, settings_env, tbss_queue, write_commands
from .faults import Markers, gone, job, wait_until

pytestmark = pytest.mark.slow


def marked(i: object, marks: Markers, log: Path, *extra: str) -> str:
    return job(i, log, "--marker", str(marks.dir), *extra)


def test_a_lost_after_that_leaves_no_room_for_a_renewal_is_refused_naming_the_smallest(
    tmp_path: Path, settings: Settings, run_tag: str
) -> None:
    # Given HEARTBEAT 2 s and LOST_AFTER 6 s, which the old check ("more than twice") took
    env = {
        **settings_env(settings, run_tag),
        "TBSS_QUEUE_HEARTBEAT": "2",
        "TBSS_QUEUE_LOST_AFTER": "6",
    }
    # When a worker is started with them
    res = tbss_queue("worker", "--name", "w1", "--allow-any", env=env, cwd=tmp_path, timeout=60)
    # Then it refuses to start, in one line that names the smallest LOST_AFTER allowed
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines() == [
        "tbss-queue: error: TBSS_QUEUE_LOST_AFTER (6 s) is too short for TBSS_QUEUE_HEARTBEAT "
        "2 s: the smallest allowed is 8 s (a runner stops its command after LOST_AFTER - 2 x "
        "HEARTBEAT without a renewal, which must hold 2 renewal intervals)"
    ]


def test_the_smallest_lost_after_allowed_runs_healthy_commands_once_each(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker]
) -> None:
    # Given HEARTBEAT 2 s and the smallest LOST_AFTER allowed for it, on two nodes
    tight = settings.with_(heartbeat=2.0, lost_after=8.0)
    assert tight.lost_after == tight.min_lost_after
    env = {"TBSS_QUEUE_HEARTBEAT": "2", "TBSS_QUEUE_LOST_AFTER": "8"}
    workers("w1", 10, env=env)
    workers("w2", 10, env=env)
    marks, log = Markers(tmp_path / "marks"), tmp_path / "log"
    ids = [str(i) for i in range(20)]
    # When 20 healthy commands of 12 s each run (several renewals each)
    cmds = write_commands(tmp_path / "cmds", [marked(i, marks, log, "--sleep", "12") for i in ids])
    batch = api.submit(cmds, settings=tight)
    final = api.wait(batch.id, settings=tight, timeout=180)
    # Then every one started once and completed once: no renewal killed any
    assert (final.succeeded, final.failed, final.queued, final.running) == (20, 0, 0, 0)
    assert final.requeued == 0
    marks.assert_exactly_once(ids)


def test_a_node_whose_runner_keeps_freezing_is_quarantined_and_its_commands_finish_elsewhere(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], run_tag: str
) -> None:
    # Given a node with one slot, running commands that outlast a runner's margin
    marks, log = Markers(tmp_path / "marks"), tmp_path / "log"
    w1 = workers("w1", 1)
    ids = [str(i) for i in range(3)]
    cmds = write_commands(tmp_path / "cmds", [marked(i, marks, log, "--sleep", "5") for i in ids])
    batch = api.submit(cmds, settings=settings)
    losses = 0
    # When its pool process is stopped, each time a command starts there, until its guard has
    # killed the command (LOST_AFTER - 2 x HEARTBEAT without a renewal), then let go on
    for losses in range(1, 4):
        wait_until(
            lambda n=losses: sum(len(marks.starts(i)) for i in ids) == n,
            timeout=30,
            what=f"start number {losses} on w1",
        )
        [copy] = [m for i in ids for m in marks.starts(i)][-1:]
        runner = psutil.Process(copy.pid).ppid()
        assert runner in [c.pid for c in psutil.Process(w1.proc.pid).children(recursive=True)]
        os.kill(runner, signal.SIGSTOP)
        try:
            assert gone([copy.pid], timeout=settings.runner_margin + 5)
        finally:
            os.kill(runner, signal.SIGCONT)
    # Then after the third lease lost that way the node is quarantined, saying why
    wait_until(
        lambda: any(n.quarantined for n in api.nodes(settings=settings)), what="w1 quarantined"
    )
    env = settings_env(settings, run_tag)
    [listed] = json.loads(tbss_queue("nodes", "--json", env=env).stdout)
    assert listed["node"].startswith("w1@")
    assert listed["quarantined"].startswith("its runners lost 3 leases within 40 s, each time 2 s")
    shown = tbss_queue("status", batch.id, env=env).stdout
    assert f"{listed['node']} quarantined: its runners lost 3 leases" in shown
    checked = tbss_queue("doctor", env=env)
    assert "quarantined, takes no commands: its runners lost 3 leases" in checked.stdout
    # and it stays so, though it is the only node (no command is its own fault here)
    assert w1.proc.poll() is None
    assert api.status(batch.id, settings=settings).succeeded == 0
    # and on another node, every command completes exactly once, none of them failed
    workers("w2", 3)
    final = api.wait(batch.id, settings=settings, timeout=90)
    assert (final.succeeded, final.failed, final.queued, final.running) == (3, 0, 0, 0)
    counts = marks.counts(ids)
    assert sum(s for s, _ in counts.values()) == 3 + losses, counts
    assert all(d == 1 for _, d in counts.values()), counts
    assert {t.node.split("@")[0] for t in api.tasks(batch.id, settings=settings) if t.node} == {
        "w2"
    }
