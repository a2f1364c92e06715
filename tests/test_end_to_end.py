"""Submit a commands file, run it on two real worker nodes, read its status."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from tbss_queue import api
from tbss_queue.config import Settings

from .conftest import Worker, settings_env, tbss_queue, write_commands

JOB = str(Path(__file__).parent / "bin" / "job.py")
DATA = Path(__file__).parent / "data"


def job(i: int | str, *extra: str) -> str:
    return f"{sys.executable} {JOB} {i} " + " ".join(extra)


def test_forty_commands_run_on_two_nodes(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], run_tag: str
) -> None:
    # Given two worker nodes and 40 commands that each write their own file
    workers("w1")
    workers("w2")
    cmds = write_commands(
        tmp_path / "cmds", [job(i, "--sleep", "0.2", "--out", f"out_{i}.txt") for i in range(40)]
    )
    # When the file is submitted and waited for
    done = tbss_queue("submit", str(cmds), "--wait", env=settings_env(settings, run_tag))
    # Then it exits 0, every output exists, and status says 40 succeeded, done, on both nodes
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.glob("out_*.txt")) == sorted(
        f"out_{i}.txt" for i in range(40)
    )
    res = tbss_queue("status", "--json", env=settings_env(settings, run_tag))
    st = json.loads(res.stdout)
    assert st["total"] == 40 and st["succeeded"] == 40 and st["done"] is True
    assert st["queued"] == st["running"] == st["failed"] == 0
    by_node = {n["node"].split("@")[0]: n["succeeded"] for n in st["nodes"]}
    assert set(by_node) == {"w1", "w2"} and all(by_node.values())
    assert sum(by_node.values()) == 40


def test_a_failing_command_is_reported_and_the_rest_succeed(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], run_tag: str
) -> None:
    workers("w1")
    lines = [job(i, "--out", f"out_{i}") for i in range(5)]
    lines.insert(2, job("bad", "--exit", "3", "--stderr", "'flirt: cannot open image'"))
    cmds = write_commands(tmp_path / "cmds", lines)
    res = tbss_queue("submit", str(cmds), "--wait", env=settings_env(settings, run_tag))
    # submit --wait exits 1 when a command failed, and shows it
    assert res.returncode == 1
    assert "flirt: cannot open image" in res.stderr
    st = api.status(settings=settings)
    assert (st.succeeded, st.failed, st.done) == (5, 1, True)
    [failed] = api.failures(settings=settings)
    assert failed.exit_code == 3 and failed.cause == "exit" and failed.line == 3
    assert "flirt: cannot open image" in failed.stderr_tail
    assert "exit code 3" in failed.message
    status_text = tbss_queue("status", env=settings_env(settings, run_tag)).stdout
    assert "flirt: cannot open image" in status_text


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("missing.commands", "no such file"),
        ("empty.commands", "no commands"),
        ("unbalanced_line7.commands", "unbalanced_line7.commands:7: unbalanced quote"),
        ("binary.commands", "binary.commands:2: binary"),
    ],
)
def test_bad_files_exit_2_and_leave_redis_untouched(
    name: str, expected: str, tmp_path: Path, settings: Settings, run_tag: str
) -> None:
    src = DATA / name
    target = tmp_path / name
    if src.exists():
        shutil.copy(src, target)
    client = redis.Redis.from_url(settings.broker)
    before = client.dbsize()
    res = tbss_queue("submit", str(target), env=settings_env(settings, run_tag))
    assert res.returncode == 2
    assert expected in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert "Traceback" not in res.stderr
    assert client.dbsize() == before == 0


def test_submit_wait_exit_code_zero_when_all_succeed(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], run_tag: str
) -> None:
    workers("w1")
    cmds = write_commands(tmp_path / "cmds", [job(i) for i in range(3)])
    res = tbss_queue("submit", str(cmds), "--wait", "--json", env=settings_env(settings, run_tag))
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["succeeded"] == 3


def test_status_cost_does_not_grow_with_the_batch(tmp_path: Path, settings: Settings) -> None:
    # Given a 10-command and a 10,000-command batch (no workers: everything stays queued)
    small = write_commands(tmp_path / "small", [f"true {i}" for i in range(10)])
    big = write_commands(tmp_path / "big", [f"true big{i}" for i in range(10_000)])
    small_id = api.submit(small, settings=settings).id
    big_id = api.submit(big, settings=settings).id
    client = redis.Redis.from_url(settings.broker)

    def commands_for(batch_id: str) -> tuple[int, int]:
        client.config_resetstat()
        st = api.status(batch_id, settings=settings)
        stats = client.info("commandstats")
        # our own INFO/CONFIG calls are not status's (Redis 7 names CONFIG's as config|...)
        ours = ("cmdstat_info", "cmdstat_config")
        used = sum(v["calls"] for k, v in stats.items() if k.split("|")[0] not in ours)
        return used, st.queued

    # When status is asked of each
    small_cost, small_queued = commands_for(small_id)
    big_cost, big_queued = commands_for(big_id)
    # Then it issues the same, small number of Redis commands for both (counts, rates,
    # requeues, and the nodes' heartbeats, stop marks, quarantine, what they cannot run and
    # why they are paused: one pipeline)
    assert (small_queued, big_queued) == (10, 10_000)
    assert big_cost == small_cost <= 14


def test_a_batch_is_committed_whole_and_kept_and_a_resubmission_merges(
    tmp_path: Path, settings: Settings
) -> None:
    # Given a new batch of three commands, one of them already done
    (tmp_path / "a.done").write_text("output\n")
    cmds = write_commands(tmp_path / "c", ["touch a.done", "touch b.done", "touch c.done"])
    batch = api.submit(cmds, cwd=tmp_path, done_if_exists="{out}", settings=settings)
    # Then its records are committed as they were staged, with no expiry left on them
    client = redis.Redis.from_url(settings.broker)
    for part in ("", "cmd", "state", "counts"):
        assert client.ttl(f"tbssq:b:{batch.id}" + (f":{part}" if part else "")) == -1, part
    assert not client.keys("*:stage*") and not client.keys("*:staging")
    st = api.status(batch.id, settings=settings)
    assert (st.total, st.queued, st.skipped) == (3, 2, 1)
    assert client.llen("tbss-queue") == 2
    # When the file gains a line and is submitted again, only that line is added
    write_commands(cmds, ["touch a.done", "touch b.done", "touch c.done", "touch d.done"])
    again = api.submit(cmds, cwd=tmp_path, done_if_exists="{out}", settings=settings)
    st = api.status(again.id, settings=settings)
    assert again.id == batch.id and again.queued == 1
    assert (st.total, st.queued, st.skipped) == (4, 3, 1)
    assert client.llen("tbss-queue") == 3
