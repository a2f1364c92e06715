"""What `status`, `batches`, the report, `nodes` and the API say about a batch and its nodes
(issue 15, points 2 and 3): rates frozen at the end with one definition, node health, requeues."""

from __future__ import annotations

import inspect
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

from tbss_queue import api
from tbss_queue.config import Settings
from tbss_queue.models import BatchStatus, NodeStatus
from tbss_queue.queue.publish import label

from .conftest import Worker, settings_env, tbss_queue, write_commands
from .test_reliability import job


def test_an_ended_batchs_rates_are_frozen_and_the_same_everywhere(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], run_tag: str
) -> None:
    # Given a batch of 6 short commands that has ended
    workers("w1", 2)
    cmds = write_commands(
        tmp_path / "c", [job(i, tmp_path / "log", "--sleep", "0.3") for i in range(6)]
    )
    batch = api.submit(cmds, settings=settings)
    ended = api.wait(batch.id, settings=settings, timeout=60)
    env = settings_env(settings, run_tag)
    assert ended.rate_overall > 0 and ended.as_of == ended.last_ended

    def figures() -> list[tuple[float, float]]:
        shown = json.loads(tbss_queue("status", batch.id, "--json", env=env).stdout)
        [listed] = json.loads(tbss_queue("batches", "--json", env=env).stdout)
        summary = api.report(batch.id, settings=settings)["summary"]
        st = api.status(batch.id, settings=settings)
        return [
            (shown["rate_overall"], shown["rate_recent"]),
            (listed["rate_overall"], listed["rate_recent"]),
            (summary["per_minute"], summary["per_minute_recent"]),
            (st.rate_overall, st.rate_recent),
        ]

    # When it is looked at now and again a while later
    now = figures()
    time.sleep(4)
    later = figures()
    # Then status, batches, the report and the API give the same figures, and they stay put
    assert len(set(now)) == 1, now
    assert now == later == [(ended.rate_overall, ended.rate_recent)] * 4
    text = tbss_queue("status", batch.id, env=env).stdout
    assert f"{ended.rate_overall:.1f}/min overall" in text and "ended " in text


def test_node_health_lost_then_requeued_by_another_then_stopping(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], run_tag: str
) -> None:
    env = settings_env(settings, run_tag)
    # Given a node running two 30 s commands
    doomed = workers("w1", 2)
    cmds = write_commands(
        tmp_path / "c", [job(f"long{i}", tmp_path / "log", "--sleep", "30") for i in range(2)]
    )
    batch = api.submit(cmds, settings=settings)
    _until(lambda: api.status(batch.id, settings=settings).running == 2)
    listed = json.loads(tbss_queue("nodes", "--json", env=env).stdout)
    assert [(n["state"], len(n["running"])) for n in listed] == [("online", 2)]
    labels = sorted(label(t.argv) for t in api.tasks(batch.id, settings=settings))
    assert listed[0]["running"] == labels  # the commands by their labels (Flower's names)
    # When it is killed (kill -9 of the whole node)
    doomed.signal(signal.SIGKILL)
    # Then, with no other node, status says it is lost, with its running commands, and that
    # no worker is online
    _until(lambda: _node(api.status(batch.id, settings=settings), "w1").state == "lost")
    text = tbss_queue("status", batch.id, env=env).stdout
    assert "no worker online for" in text, text
    assert "lost: no heartbeat for" in text and "its 2 running commands go back" in text, text
    assert [n["state"] for n in json.loads(tbss_queue("nodes", "--json", env=env).stdout)] == [
        "lost"
    ]
    # When another node starts, its reaper requeues both, naming them in its log
    rescuer = workers("w2", 2)
    _until(lambda: api.status(batch.id, settings=settings).requeued == 2)
    st = api.status(batch.id, settings=settings)
    assert (st.requeued, st.lost) == (2, 2)
    assert _node(st, "w1").requeued == 2 and _node(st, "w2").state == "online"
    assert (
        "requeued 2 times, 2 because a node was lost"
        in tbss_queue("status", batch.id, env=env).stdout
    )
    _until(lambda: f"requeued {labels[0]} (batch {batch.id}" in rescuer.log.read_text())
    assert [n["state"] for n in api.report(batch.id, settings=settings)["summary"]["node_health"]]
    # When the rescuer is stopped (SIGTERM) while it runs them, it is stopping, then stopped
    _until(lambda: _node(api.status(batch.id, settings=settings), "w2").running == 2)
    rescuer.proc.send_signal(signal.SIGTERM)  # the main process only, as systemctl stop does
    _until(lambda: _node(api.status(batch.id, settings=settings), "w2").state == "stopping")
    stopping = [n for n in api.nodes(settings=settings) if n.node.startswith("w2@")]
    assert stopping[0].state == "stopping" and len(stopping[0].running) == 2


def _node(st: BatchStatus, name: str) -> NodeStatus:
    [node] = [n for n in st.nodes if n.node.startswith(name + "@")]
    return node


def _until(check: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    raise AssertionError(f"not reached in {timeout} s: {inspect.getsource(check).strip()}")
