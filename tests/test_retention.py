"""Nothing kept for ever, nothing that stalls Redis: retention, forget, a full broker, and the
bounded steps a large submission, resubmission or cancel is carried out in.

Real redis-server, real `tbss-queue worker` processes. What a user sees: keys with a TTL, a
batch gone from `batches`, one line and an exit code, exact counts.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from tbss_queue import api
from tbss_queue.config import Settings
from tbss_queue.queue.batches import BatchStore
from tbss_queue.queue.broker import connect
from tbss_queue.queue.keys import (
    ACTIVE,
    BATCHES,
    CHUNK,
    FILES,
    LEGACY_INDEX,
    batch_key,
    index_key,
    task_id_for,
)
from tbss_queue.redis_server import RedisServer, free_port

from .conftest import Worker, settings_env, tbss_queue, write_commands
from .faults import Markers, alive, job, wait_until

KEEP = 3600.0


@pytest.fixture
def settings(redis_url: str) -> Settings:
    return Settings.resolve(env={}, broker=redis_url, heartbeat=1.0, lost_after=4.0, keep=KEEP)


def batch_keys(client: redis.Redis, batch: str) -> list[str]:
    return [batch_key(batch), *client.scan_iter(match=batch_key(batch, "*"), count=1000)]


def references(client: redis.Redis, batch: str) -> list[str]:
    """Where a batch is still named outside its own keys."""
    found = []
    if client.zscore(BATCHES, batch) is not None:
        found.append("batches")
    if client.sismember(ACTIVE, batch):
        found.append("active")
    found += [f"files:{k}" for k, v in client.hgetall(FILES).items() if v == batch]
    for bucket in client.scan_iter(match="tbssq:index:*", count=1000):
        found += [f"index:{k}" for k, v in client.hgetall(bucket).items() if v == batch]
    return found


def test_every_key_of_an_ended_batch_expires_and_forget_drops_them_now(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], run_tag: str
) -> None:
    # Given a batch with a success and a failure, run to its end by a real worker
    client = connect(settings)
    workers("w1", 2)
    cmds = write_commands(tmp_path / "cmds", ["true 1", "false 2"])
    batch = api.submit(cmds, settings=settings)
    api.wait(batch.id, settings=settings, poll=0.2, timeout=60)
    # Then within a heartbeat or two every key of it carries the retention TTL
    wait_until(lambda: not client.sismember(ACTIVE, batch.id), 30, "the batch to end")
    keys = batch_keys(client, batch.id)
    assert {batch_key(batch.id, p) for p in ("state", "cmd", "result", "counts")} <= set(keys)
    ttls = {k: client.ttl(k) for k in keys}
    assert all(0 < t <= KEEP for t in ttls.values()), ttls
    assert api.status(batch.id, settings=settings).failed == 1  # still readable meanwhile
    named = references(client, batch.id)  # what forget must drop (an ended batch is not active)
    assert ["batches"] == named[:1] and len([r for r in named if r.startswith("index:")]) == 2
    assert len([r for r in named if r.startswith("files:")]) == 1
    # (and an fsl_sub job id naming it, as the fsl_sub plugin keeps one)
    client.hset("tbssq:job:7", mapping={"batch": batch.id, "name": "tbss_2_reg"})
    # When it is forgotten
    env = settings_env(settings, run_tag)
    done = tbss_queue("forget", batch.id, env=env)
    assert done.returncode == 0, done.stderr
    assert f"batch {batch.id}: forgotten" in done.stderr
    # Then nothing of it is left: keys, the batch list, the file and index entries
    assert batch_keys(client, batch.id) == [batch_key(batch.id)]
    assert not client.exists(batch_key(batch.id))
    assert references(client, batch.id) == []
    assert not client.exists("tbssq:job:7")
    gone = tbss_queue("status", batch.id, env=env)
    assert gone.returncode == 2 and "not found" in gone.stderr
    # And the same file submits again as a new batch that runs everything
    again = api.submit(cmds, settings=settings)
    assert again.id != batch.id and again.queued == 2


def test_forget_refuses_a_batch_that_is_still_running(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], run_tag: str
) -> None:
    workers("w1", 1)
    cmds = write_commands(tmp_path / "cmds", ["sleep 30"])
    batch = api.submit(cmds, settings=settings)
    wait_until(lambda: api.status(batch.id, settings=settings).running == 1, what="running")
    out = tbss_queue("forget", batch.id, env=settings_env(settings, run_tag))
    assert out.returncode == 2
    assert out.stderr.strip() == (
        f"tbss-queue: error: batch {batch.id} has 1 command(s) queued or running: "
        f"cancel it first (tbss-queue cancel {batch.id})"
    )
    assert api.status(batch.id, settings=settings).running == 1


def test_a_retried_batch_is_kept_again_and_expired_batches_leave_no_references(
    tmp_path: Path, redis_url: str, workers: Callable[..., Worker]
) -> None:
    # A retention of 4 s, so that expiry happens during the test
    settings = Settings.resolve(env={}, broker=redis_url, heartbeat=1.0, lost_after=4.0, keep=4)
    client = connect(settings)
    flag = tmp_path / "fixed"
    cmds = write_commands(tmp_path / "cmds", [f"test -e {flag}", "true"])
    batch = api.submit(cmds, settings=settings)
    workers("w1", 2, env={"TBSS_QUEUE_KEEP": "4"})
    assert api.wait(batch.id, settings=settings, poll=0.2, timeout=60).failed == 1
    wait_until(lambda: client.ttl(batch_key(batch.id, "state")) > 0, 30, "retention TTL")
    # When the failure is fixed and retried: the batch is active again, its keys permanent
    flag.touch()
    api.retry(batch.id, settings=settings)
    assert client.ttl(batch_key(batch.id, "state")) == -1
    assert api.wait(batch.id, settings=settings, poll=0.2, timeout=60).succeeded == 2
    # Then, after it ends again and its retention passes, a worker drops every reference
    wait_until(lambda: references(client, batch.id) == [], 60, "expired references dropped")
    assert batch_keys(client, batch.id) == [batch_key(batch.id)]
    assert api.list_batches(settings=settings) == []


def test_the_index_is_kept_in_buckets_and_one_left_by_an_older_version_is_read_and_swept(
    redis_url: str,
) -> None:
    client = connect(Settings.resolve(env={}, broker=redis_url))
    store = BatchStore(client)
    a, b, c, d = (ch * 40 for ch in "abcd")
    # Given an older version's index, one hash with "B" or "B|task" per command...
    client.hset(LEGACY_INDEX, mapping={a: "old", b: "kept|t1", c: "old|t2"})
    client.hset(batch_key("kept", "state"), "t1", "queued")
    client.hset(batch_key("old", "state"), mapping={task_id_for("old", a): "succeeded"})
    client.hset(batch_key("old", "state"), "t2", "failed")
    # ...and a newer batch that queued command d, indexed in d's bucket
    client.hset(index_key(d), d, "new")
    client.hset(batch_key("new", "state"), task_id_for("new", d), "queued")
    assert index_key(d) == "tbssq:index:dd"
    # Then both are read
    assert store.live_tasks([a, b, c, d, "e" * 40]) == {
        a: ("old", task_id_for("old", a), "succeeded"),
        b: ("kept", "t1", "queued"),
        c: ("old", "t2", "failed"),
        d: ("new", task_id_for("new", d), "queued"),
    }
    # And when batches old and new are gone, their entries go from both
    assert store.drop_references({"old", "new"}) == 3
    assert client.hgetall(LEGACY_INDEX) == {b: "kept|t1"}
    assert not client.exists(index_key(d))


def test_a_full_broker_refuses_submit_in_one_line_while_running_commands_finish(
    tmp_path: Path, run_tag: str, workers: Callable[..., Worker]
) -> None:
    server = RedisServer(tmp_path / "redis", port=free_port(), persistent=False).start()
    try:
        settings = Settings.resolve(env={}, broker=server.url, heartbeat=1.0, lost_after=4.0)
        client = connect(settings)
        env = settings_env(settings, run_tag)
        # Given two commands running on a worker of a Redis with noeviction
        marks, log = Markers(tmp_path / "marks"), tmp_path / "log"
        first = write_commands(
            tmp_path / "first",
            [job(i, log, "--marker", str(marks.dir), "--sleep", "8") for i in ("a", "b")],
        )
        batch = api.submit(first, settings=settings)
        workers("w1", 2, env={"TBSS_QUEUE_BROKER": server.url})
        wait_until(lambda: api.status(batch.id, settings=settings).running == 2, what="running")
        # When Redis reaches its maxmemory, and a large file is submitted
        used = int(client.info("memory")["used_memory"])
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", used + 256 * 1024)
        big = write_commands(tmp_path / "big", [f"true {i}" for i in range(20000)])
        before = set(client.keys("*"))
        out = tbss_queue("submit", str(big), env=env)
        # Then submit says so in one line, exits 3, and leaves nothing behind
        assert out.returncode == 3, out.stderr
        lines = out.stderr.strip().splitlines()
        assert lines[-1].startswith("tbss-queue: error: the broker is out of memory"), lines
        assert "nothing was queued" in lines[-1] and "maxmemory" in lines[-1]
        assert not [ln for ln in lines if "Traceback" in ln]
        assert set(client.keys("*")) - before == set()
        assert [b.batch for b in api.list_batches(settings=settings)] == [batch.id]
        # And the running commands finish, each exactly once, recorded as succeeded
        final = api.wait(batch.id, settings=settings, poll=0.5, timeout=90)
        assert (final.succeeded, final.failed) == (2, 0)
        marks.assert_exactly_once(["a", "b"])
    finally:
        server.stop()


def test_a_submission_whose_submitter_died_after_its_commit_is_applied_by_a_worker(
    tmp_path: Path,
    settings: Settings,
    workers: Callable[..., Worker],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a batch of more commands than one step merges, all cancelled before any ran
    n = CHUNK + 7
    cmds = write_commands(tmp_path / "cmds", [f"true {i}" for i in range(n)])
    batch = api.submit(cmds, settings=settings)
    assert api.cancel(batch.id, settings=settings).cancelled == n
    # And a retry whose submitter dies right after its commit (nothing applied yet)
    monkeypatch.setattr(BatchStore, "apply", lambda self, batch_id: None)
    api.retry(batch.id, settings=settings)
    monkeypatch.undo()
    store = BatchStore(connect(settings))
    assert store.pending() == [batch.id]
    assert api.status(batch.id, settings=settings).cancelled == n
    # When a worker starts
    workers("w1", 2)
    # Then its reaper applies the retry: every command queued once, and run
    final = api.wait(batch.id, settings=settings, poll=0.5, timeout=300)
    assert (final.succeeded, final.cancelled, final.total) == (n, 0, n)
    assert store.pending() == []


def test_a_resubmission_and_a_cancel_larger_than_one_step_keep_exact_counts(
    tmp_path: Path, settings: Settings
) -> None:
    # Given a batch of several steps' worth of commands, some of them then cancelled
    n = 3 * CHUNK + 11
    cmds = write_commands(tmp_path / "cmds", [f"true {i}" for i in range(n)])
    batch = api.submit(cmds, settings=settings)
    assert api.status(batch.id, settings=settings).queued == n
    # When the file grows and is submitted again, then the batch is cancelled
    write_commands(cmds, [f"true {i}" for i in range(n + CHUNK)])
    again = api.submit(cmds, settings=settings)
    assert (again.id, again.queued) == (batch.id, CHUNK)
    client = connect(settings)
    assert client.llen(settings.queue) == n + CHUNK
    cancelled = api.cancel(batch.id, settings=settings)
    # Then every command is counted once, in the state its record holds
    assert (cancelled.cancelled, cancelled.queued, cancelled.total) == (n + CHUNK, 0, n + CHUNK)
    states = client.hvals(batch_key(batch.id, "state"))
    assert states.count("cancelled") == n + CHUNK


def test_a_batch_whose_workers_die_the_moment_it_ends_still_expires(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker]
) -> None:
    # Given a batch whose two commands run on a node whose main process (its tidy passes
    # included) is then frozen: only its pool processes, recording the outcomes, go on
    client = connect(settings)
    marks, log = Markers(tmp_path / "marks"), tmp_path / "log"
    w1 = workers("w1", 2)
    lines = [job(i, log, "--marker", str(marks.dir), "--sleep", "1") for i in range(2)]
    batch = api.submit(write_commands(tmp_path / "cmds", lines), settings=settings)
    wait_until(lambda: len(marks.ids()) == 2, what="both commands to start")
    os.kill(w1.proc.pid, signal.SIGSTOP)
    try:
        # When the last outcome is recorded, and the workers are killed at that moment
        wait_until(lambda: not client.sismember(ACTIVE, batch.id), 30, "the batch to end")
    finally:
        w1.stop()
    # Then every key that names it expires with the retention time, none is left for ever
    assert api.status(batch.id, settings=settings).succeeded == 2
    ttls = {k: client.ttl(k) for k in batch_keys(client, batch.id)}
    assert batch_key(batch.id, "nodes") in ttls and batch_key(batch.id, "runs") in ttls
    assert all(0 < t <= KEEP for t in ttls.values()), ttls


def test_forget_after_cancel_waits_for_the_stopping_command_and_leaves_nothing_behind(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], run_tag: str
) -> None:
    # Given a running command that takes its time to stop (it ignores SIGTERM for a while)
    client = connect(settings)
    workers("w1", 1)
    pidfile = tmp_path / "pid"
    script = tmp_path / "stubborn.py"
    script.write_text(
        "import os, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "open(sys.argv[1], 'w').write(str(os.getpid()))\n"
        "time.sleep(600)\n"
    )
    cmds = write_commands(tmp_path / "cmds", [f"{sys.executable} {script} {pidfile}"])
    batch = api.submit(cmds, settings=settings)
    wait_until(lambda: pidfile.exists() and pidfile.read_text(), what="the command to start")
    pid = int(pidfile.read_text())
    # When the batch is cancelled and forgotten at once, while the command is still stopping
    api.cancel(batch.id, settings=settings)
    assert alive([pid]), "the command should still be stopping (SIGTERM ignored)"
    env = settings_env(settings, run_tag)
    res = tbss_queue("forget", batch.id, env=env)
    assert res.returncode == 0, res.stderr
    # Then forget has returned only once the command was gone
    assert not alive([pid])
    # and nothing of the batch is left, now or once the runner has let go
    wait_until(lambda: not client.hlen("tbssq:running"), 30, "the runner to let go")
    assert batch_keys(client, batch.id) == [batch_key(batch.id)]
    assert not client.exists(batch_key(batch.id))
    assert references(client, batch.id) == []


def test_a_cancel_after_a_resubmission_committed_but_not_applied_stops_what_it_queues(
    tmp_path: Path,
    settings: Settings,
    workers: Callable[..., Worker],
    monkeypatch: pytest.MonkeyPatch,
    run_tag: str,
) -> None:
    # Given a batch cancelled before anything ran
    marks, log = Markers(tmp_path / "marks"), tmp_path / "log"
    ids = [str(i) for i in range(6)]
    cmds = write_commands(tmp_path / "cmds", [job(i, log, "--marker", str(marks.dir)) for i in ids])
    batch = api.submit(cmds, settings=settings)
    assert api.cancel(batch.id, settings=settings).cancelled == 6
    # And a resubmission whose submitter died right after its commit (nothing applied yet)
    monkeypatch.setattr(BatchStore, "apply", lambda self, batch_id: 0)
    api.submit(cmds, settings=settings)
    monkeypatch.undo()
    store = BatchStore(connect(settings))
    assert store.pending() == [batch.id]
    # When the batch is cancelled again, and a worker comes
    res = tbss_queue("cancel", batch.id, "--yes", env=settings_env(settings, run_tag))
    assert res.returncode == 0, res.stderr
    assert store.pending() == []
    workers("w1", 2)
    client = connect(settings)
    wait_until(
        lambda: client.llen(settings.queue) == 0 and not client.hlen("unacked"),
        what="every message handed out",
    )
    # Then what the resubmission queued was cancelled with the rest: nothing ran
    final = api.status(batch.id, settings=settings)
    assert (final.cancelled, final.queued, final.running, final.succeeded) == (6, 0, 0, 0)
    assert marks.ids() == []


def test_a_held_batch_can_be_cancelled_and_never_runs(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], run_tag: str
) -> None:
    # Given batch `second`, held until batch `first` ends (submit --after, fsl_sub's -j)
    marks, log = Markers(tmp_path / "marks"), tmp_path / "log"
    first = api.submit(
        write_commands(tmp_path / "first", [job("a", log, "--sleep", "2")]), settings=settings
    )
    lines = [job(f"b{i}", log, "--marker", str(marks.dir)) for i in range(3)]
    second = api.submit(
        write_commands(tmp_path / "second", lines), settings=settings, after=[first.id]
    )
    # When it is cancelled from the command line while it waits
    env = settings_env(settings, run_tag)
    res = tbss_queue("cancel", second.id, "--yes", env=env)
    # Then that works, and says what became of it
    assert res.returncode == 0, res.stderr
    assert f"batch {second.id}: 0 succeeded" in res.stderr and "3 cancelled of 3" in res.stderr
    # and once the batch it waited for has ended, nothing of it has run
    workers("w1", 2)
    assert api.wait(first.id, settings=settings, timeout=60).succeeded == 1
    wait_until(lambda: not BatchStore(connect(settings)).held(), what="no hold left")
    final = api.status(second.id, settings=settings)
    assert (final.cancelled, final.queued, final.succeeded) == (3, 0, 0)
    assert final.warnings == (f"cancelled while held until batch(es) {first.id} ended",)
    assert marks.ids() == []


def test_a_batch_held_on_one_that_failed_never_runs_and_says_why(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], run_tag: str
) -> None:
    # Given batch `second`, held until batch `first` ends, and `first` has a command that fails
    marks, log = Markers(tmp_path / "marks"), tmp_path / "log"
    first = api.submit(
        write_commands(tmp_path / "first", [job("ok", log), job("bad", log, "--exit", "3")]),
        settings=settings,
    )
    lines = [job(f"b{i}", log, "--marker", str(marks.dir)) for i in range(3)]
    second = api.submit(
        write_commands(tmp_path / "second", lines), settings=settings, after=[first.id]
    )
    # When `first` ends with that failure
    workers("w1", 2)
    assert api.wait(first.id, settings=settings, timeout=60).failed == 1
    wait_until(lambda: not BatchStore(connect(settings)).held(), what="the hold to be judged")
    # Then `second` never runs (as Slurm's afterok), and its status says why
    res = tbss_queue("status", second.id, env=settings_env(settings, run_tag))
    assert (
        f"dependency never satisfied: batch {first.id} ended with 1 failed, 0 cancelled"
        in res.stdout + res.stderr
    )
    final = api.status(second.id, settings=settings)
    assert (final.cancelled, final.queued, final.succeeded, final.running) == (3, 0, 0, 0)
    assert marks.ids() == []


def test_a_held_batch_whose_canceller_died_after_the_commit_is_still_cancelled(
    tmp_path: Path,
    settings: Settings,
    workers: Callable[..., Worker],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a held batch, and a cancel of it that dies right after committing it (before it
    # marked a single command)
    marks, log = Markers(tmp_path / "marks"), tmp_path / "log"
    first = api.submit(write_commands(tmp_path / "first", [job("a", log)]), settings=settings)
    lines = [job(f"b{i}", log, "--marker", str(marks.dir)) for i in range(3)]
    second = api.submit(
        write_commands(tmp_path / "second", lines), settings=settings, after=[first.id]
    )
    monkeypatch.setattr(BatchStore, "cancel", lambda self, batch_id: 0)
    api.cancel(second.id, settings=settings)
    monkeypatch.undo()
    store = BatchStore(connect(settings))
    assert store.pending() == [second.id] and not store.held()
    # When workers come, whose reapers apply what is pending
    workers("w1", 2)
    assert api.wait(first.id, settings=settings, timeout=60).succeeded == 1
    wait_until(lambda: not store.pending(), what="the pending submission to be carried out")
    # Then none of it ran: the commit said it was to be cancelled, and it was
    final = api.status(second.id, settings=settings)
    assert (final.cancelled, final.queued, final.succeeded, final.running) == (3, 0, 0, 0)
    assert marks.ids() == []
