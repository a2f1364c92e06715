"""One owner per command: leases, cancel, node faults, Redis trouble, process trees.

Real redis-server, real `tbss-queue worker` processes (several nodes = several processes with
distinct names), network cuts in a network namespace made here. Every test ends with exact
counts from per-command marker files: a `start PID TIME` line for every copy that started and a
`done PID TIME` line for every copy that completed.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import redis

from tbss_queue import api
from tbss_queue.config import Settings
from tbss_queue.queue.batches import BatchStore
from tbss_queue.queue.broker import connect
from tbss_queue.queue.store import script_sha
from tbss_queue.redis_server import RedisServer, free_port

from .conftest import Worker, settings_env, tbss_queue, write_commands
from .faults import Markers, alive, gone, job, signal_all, tree, wait_until
from .proxy import holding

pytestmark = pytest.mark.slow


def marked(i: object, marks: Markers, log: Path, *extra: str) -> str:
    return job(i, log, "--marker", str(marks.dir), *extra)


def running_on(settings: Settings, batch: str, prefix: str) -> bool:
    return any(
        n.node.startswith(prefix) and n.running for n in api.status(batch, settings=settings).nodes
    )


def test_cancel_while_running_then_retry_runs_every_command_exactly_once(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], run_tag: str
) -> None:
    # Given 4 commands running and 20 waiting
    marks, log = Markers(tmp_path / "marks"), tmp_path / "log"
    workers("w1", 4)
    ids = [str(i) for i in range(24)]
    cmds = write_commands(tmp_path / "cmds", [marked(i, marks, log, "--sleep", "2") for i in ids])
    batch = api.submit(cmds, settings=settings)
    wait_until(lambda: api.status(batch.id, settings=settings).running == 4, what="4 running")
    env = settings_env(settings, run_tag)
    # When the batch is cancelled, then retried at once with --wait
    assert tbss_queue("cancel", batch.id, "--yes", env=env).returncode == 0
    assert api.status(batch.id, settings=settings).cancelled == 24
    res = tbss_queue("retry", batch.id, "--wait", env=env, timeout=120)
    # Then retry --wait returns, and every command completed exactly once
    assert res.returncode == 0, res.stderr
    assert "24 commands queued again" in res.stderr
    final = api.status(batch.id, settings=settings)
    assert (final.succeeded, final.cancelled, final.queued, final.running) == (24, 0, 0, 0)
    marks.assert_exactly_once(ids, restarts=True)
    # the 4 killed by the cancel started twice, the others once
    starts = sorted(len(marks.starts(i)) for i in ids)
    assert starts == [1] * 20 + [2] * 4


def test_a_frozen_node_loses_its_command_and_its_copy_dies_on_resume(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker]
) -> None:
    # Given node w1 running a 12 s command that writes an output file when it completes
    marks, log, out = Markers(tmp_path / "marks"), tmp_path / "log", tmp_path / "frozen.out"
    w1 = workers("w1", 1)
    line = marked("frozen", marks, log, "--sleep", "12", "--out", str(out))
    batch = api.submit(write_commands(tmp_path / "cmds", [line]), settings=settings)
    wait_until(lambda: marks.starts("frozen"), what="the command to start")
    old = marks.starts("frozen")[0].pid
    frozen = tree(w1.proc.pid)
    assert old in frozen
    # When w1's whole process tree, command included, is stopped past LOST_AFTER (a paused VM)
    signal_all(frozen, signal.SIGSTOP)
    try:
        workers("w2", 1)
        wait_until(lambda: len(marks.starts("frozen")) == 2, what="w2 to take the command over")
    finally:
        # ... and then resumed, all at once
        signal_all(frozen, signal.SIGCONT)
    # Then the old copy is killed within one heartbeat of resuming, before it could finish
    assert gone([old], timeout=settings.heartbeat + 1), "the old copy survived its lease"
    final = api.wait(batch.id, settings=settings, timeout=60)
    assert (final.succeeded, final.failed, final.queued, final.running) == (1, 0, 0, 0)
    [done] = marks.dones("frozen")
    assert done.pid != old
    # and the new copy's output is there: nothing of the old owner removed it
    assert out.read_text() == "frozen\n"
    [record] = api.tasks(batch.id, settings=settings)
    assert record.node is not None and record.node.startswith("w2@")


@pytest.fixture
def netns() -> Iterator[tuple[str, str, str]]:
    """A network namespace joined to this one by a veth pair: (namespace, host-side link,
    host-side address). Its traffic goes only to this machine."""
    if shutil.which("ip") is None:
        pytest.fail(
            "iproute2's `ip` is needed for the network-cut tests (apt-get install iproute2)"
        )
    tag = uuid.uuid4().hex[:6]
    ns, host_if, ns_if = f"tbssq-{tag}", f"tq{tag}h", f"tq{tag}n"
    host_ip, ns_ip = "10.254.13.1", "10.254.13.2"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    ip("netns", "add", ns)
    try:
        ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        ip("link", "set", ns_if, "netns", ns)
        ip("addr", "add", f"{host_ip}/30", "dev", host_if)
        ip("link", "set", host_if, "up")
        ip("netns", "exec", ns, "ip", "addr", "add", f"{ns_ip}/30", "dev", ns_if)
        ip("netns", "exec", ns, "ip", "link", "set", ns_if, "up")
        ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield ns, host_if, host_ip
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_a_node_cut_off_from_redis_kills_its_copy_before_another_node_reruns_it(
    tmp_path: Path,
    settings: Settings,
    workers: Callable[..., Worker],
    netns: tuple[str, str, str],
) -> None:
    # Given a Redis reachable over a link into a namespace, where node `cut` runs a command
    ns, host_if, host_ip = netns
    port = free_port()
    server = RedisServer(
        tmp_path / "redis",
        port=port,
        persistent=False,
        # the address is this test's own namespace link; Redis 7 refuses it without a password
        # unless protected mode is off
        extra_args=["--bind", "127.0.0.1", host_ip, "--protected-mode", "no"],
    ).start()
    try:
        url = f"redis://{host_ip}:{port}/0"
        here = settings.with_(broker=url)
        env = {"TBSS_QUEUE_BROKER": url}
        marks, log = Markers(tmp_path / "marks"), tmp_path / "log"
        cut = workers("cut", 1, env=env, wrap=("ip", "netns", "exec", ns))
        line = marked("far", marks, log, "--sleep", "15")
        batch = api.submit(write_commands(tmp_path / "cmds", [line]), time_limit=30, settings=here)
        wait_until(lambda: marks.starts("far"), what="the command to start in the namespace")
        old = marks.starts("far")[0].pid
        # When the link goes down (no FIN, no RST: packets just stop) past LOST_AFTER
        subprocess.run(["ip", "link", "set", host_if, "down"], check=True)
        cut_at = time.monotonic()
        workers("w2", 1, env=env)
        # Then the cut-off copy dies by itself within LOST_AFTER, long before its time limit
        assert gone([old], timeout=settings.lost_after + 2), "the cut-off copy kept running"
        assert time.monotonic() - cut_at < settings.lost_after + 2
        # and the command completes exactly once, on the node that can reach Redis
        final = api.wait(batch.id, settings=here, timeout=60)
        assert (final.succeeded, final.failed, final.queued, final.running) == (1, 0, 0, 0)
        assert marks.counts(["far"]) == {"far": (2, 1)}
        assert marks.dones("far")[0].pid != old
        assert cut.proc.poll() is None  # the cut-off node itself waits for Redis to come back
    finally:
        server.stop()


def test_a_node_that_cannot_see_one_study_runs_another_and_notices_when_it_is_mounted(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], run_tag: str
) -> None:
    # Given a good node, and a node on which study2 is not mounted (its --path-map leads to a
    # folder that is not there) while it sees study5
    marks, log = Markers(tmp_path / "marks"), tmp_path / "log"
    study2, study5, mount = tmp_path / "study2", tmp_path / "study5", tmp_path / "mnt" / "study2"
    study2.mkdir()
    study5.mkdir()
    workers("good", 1)
    workers("bad", 2, "--allow-any", "--path-map", f"{study2}={mount}")
    # When 40 commands of study2 and then 16 of study5 are submitted
    ids2 = [f"s2-{i}" for i in range(40)]
    ids5 = [f"s5-{i}" for i in range(16)]
    first = api.submit(
        write_commands(study2 / "cmds", [marked(i, marks, log) for i in ids2]), settings=settings
    )
    second = api.submit(
        write_commands(study5 / "cmds", [marked(i, marks, log) for i in ids5]), settings=settings
    )
    finals = [api.wait(b.id, settings=settings, timeout=240) for b in (first, second)]
    # Then every command succeeds exactly once: study2's all on the good node, and the bad
    # node, never out of service, ran some of study5's
    assert [(f.succeeded, f.failed, f.queued) for f in finals] == [(40, 0, 0), (16, 0, 0)]
    marks.assert_exactly_once([*ids2, *ids5])
    where2 = {t.node.split("@")[0] for t in api.tasks(first.id, settings=settings) if t.node}
    where5 = [t.node.split("@")[0] for t in api.tasks(second.id, settings=settings) if t.node]
    assert where2 == {"good"} and "bad" in where5
    # and what it cannot run is shown, without calling it quarantined, in `nodes`, `status`
    # and `doctor`
    env = settings_env(settings, run_tag)
    listed = json.loads(tbss_queue("nodes", "--json", env=env).stdout)
    [bad] = [n for n in listed if n["node"].startswith("bad@")]
    assert bad["quarantined"] is None and bad["state"] == "online"
    assert bad["cannot"] == [f"working directory {mount} not found on this node"]
    shown = tbss_queue("status", first.id, env=env).stdout
    assert f"{bad['node']} cannot run some commands, and takes the others: working" in shown
    checked = tbss_queue("doctor", env=env)
    assert "cannot run some commands, takes the others: working directory" in checked.stdout
    # And when the study is mounted there, the node notices by itself
    mount.mkdir(parents=True)
    wait_until(
        lambda: not [n for n in api.nodes(settings=settings) if n.cannot],
        what="the bad node to see study2",
    )


def test_a_command_every_node_refuses_fails_with_each_nodes_reason(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker]
) -> None:
    # Given two nodes and a commands file with one line whose executable exists nowhere
    marks, log = Markers(tmp_path / "marks"), tmp_path / "log"
    workers("w1", 1)
    workers("w2", 1)
    lines = [marked(i, marks, log) for i in range(6)] + ["/no/such/fsl_reg a b c"]
    batch = api.submit(write_commands(tmp_path / "cmds", lines), settings=settings)
    final = api.wait(batch.id, settings=settings, timeout=90)
    # Then that command fails, naming both nodes; the others ran once; no node is out of
    # service or keeps a record of a fault that was the command's
    assert (final.succeeded, final.failed) == (6, 1)
    marks.assert_exactly_once([str(i) for i in range(6)])
    [failed] = api.failures(batch.id, settings=settings)
    assert failed.cause == "not-found" and "refused by every node" in failed.message
    assert "w1@" in failed.message and "w2@" in failed.message
    assert not [n for n in api.nodes(settings=settings) if n.quarantined or n.cannot]


def test_a_batch_every_node_refuses_by_policy_fails_and_ends_and_the_nodes_stay_in_service(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker]
) -> None:
    # Given two nodes that run only what they are allowed to (python here, not /bin/true)
    marks, log = Markers(tmp_path / "marks"), tmp_path / "log"
    for name in ("w1", "w2"):
        workers(name, 2, "--root", str(tmp_path), "--allow", sys.executable)
    # When a batch of 16 commands that every node refuses is submitted
    refused = write_commands(tmp_path / "refused", [f"/bin/true {i}" for i in range(16)])
    wrong = api.submit(refused, settings=settings)
    final = api.wait(wrong.id, settings=settings, timeout=120)
    # Then every one of them fails as refused, naming both nodes, and the batch ends
    assert (final.failed, final.queued, final.running, final.succeeded) == (16, 0, 0, 0)
    failures = api.failures(wrong.id, settings=settings)
    assert {f.cause for f in failures} == {"refused"}
    assert all("refused by every node" in f.message for f in failures)
    # and the nodes stay in service: a batch they may run, submitted next, runs once each
    assert not [n for n in api.nodes(settings=settings) if n.quarantined or n.cannot]
    ids = [str(i) for i in range(8)]
    good = api.submit(
        write_commands(tmp_path / "good", [marked(i, marks, log) for i in ids]), settings=settings
    )
    assert api.wait(good.id, settings=settings, timeout=60).succeeded == 8
    marks.assert_exactly_once(ids)


BUSY_SCRIPT = """
local t0 = redis.call('TIME')
while true do
  local t = redis.call('TIME')
  if (t[1] - t0[1]) * 1000000 + (t[2] - t0[2]) > tonumber(ARGV[1]) * 1000 then return 1 end
end
"""


def test_redis_busy_for_8_seconds_kills_no_command(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker]
) -> None:
    # Given two nodes running 4 commands, with LOST_AFTER above the Redis stall
    env = {"TBSS_QUEUE_LOST_AFTER": "20"}
    marks, log = Markers(tmp_path / "marks"), tmp_path / "log"
    workers("w1", 2, env=env)
    workers("w2", 2, env=env)
    ids = [str(i) for i in range(4)]
    lines = [marked(i, marks, log, "--sleep", "14") for i in ids]
    batch = api.submit(write_commands(tmp_path / "cmds", lines), settings=settings)
    wait_until(lambda: all(marks.starts(i) for i in ids), what="4 commands running")
    # When one Lua script keeps Redis busy for 8 s (every other client gets BUSY after 5 s)
    client = redis.Redis.from_url(settings.broker, socket_timeout=30)
    assert client.eval(BUSY_SCRIPT, 0, 8000) == 1
    final = api.wait(batch.id, settings=settings.with_(lost_after=20.0), timeout=90)
    # Then no command was killed, failed or lost: each ran once
    assert (final.succeeded, final.failed, final.queued, final.running) == (4, 0, 0, 0)
    marks.assert_exactly_once(ids)
    attempts = client.hgetall(f"tbssq:b:{batch.id}:attempts")
    assert not [k for k in attempts if k.startswith(b"lost:")]


@pytest.mark.parametrize("where", ["worker cap", "submitter's default"])
def test_a_time_limit_ends_a_command_as_timeout_once(
    where: str, tmp_path: Path, settings: Settings, workers: Callable[..., Worker]
) -> None:
    # Given a worker and a submitter whose time limits differ
    marks, log = Markers(tmp_path / "marks"), tmp_path / "log"
    if where == "worker cap":
        workers("w1", 1, "--allow-any", "--max-time-limit", "2")
        submitter = settings
    else:
        workers("w1", 1, env={"TBSS_QUEUE_TIME_LIMIT": "600"})
        submitter = settings.with_(time_limit=2)
    line = marked("slow", marks, log, "--sleep", "600")
    # When a command runs past the smaller one
    batch = api.submit(write_commands(tmp_path / "cmds", [line]), settings=submitter)
    final = api.wait(batch.id, settings=settings, timeout=60)
    # Then it ends as `timeout`, once: not killed by Celery, not requeued as lost
    assert (final.failed, final.succeeded, final.queued) == (1, 0, 0)
    [failed] = api.failures(batch.id, settings=settings)
    assert failed.cause == "timeout" and "time limit of 2 s" in failed.message
    assert marks.counts(["slow"]) == {"slow": (1, 0)}


def deep_command(tmp_path: Path, settings: Settings) -> list[int]:
    """Submit a command that starts a child that starts a grandchild (fsl_reg -> fnirt);
    returns the three pids once all run."""
    pidfile, log = tmp_path / "pids", tmp_path / "log"
    line = job("deep", log, "--sleep", "600", "--grandchild", "--pidfile", str(pidfile))
    api.submit(write_commands(tmp_path / "cmds", [line]), settings=settings)
    wait_until(
        lambda: pidfile.exists() and len(pidfile.read_text().split()) == 3, what="three levels"
    )
    return [int(p) for p in pidfile.read_text().split()]


@pytest.mark.parametrize("victim", ["main process", "pool process"])
def test_sigkill_of_a_worker_leaves_no_process_of_its_commands_tree(
    victim: str, tmp_path: Path, settings: Settings, workers: Callable[..., Worker]
) -> None:
    # Given a command that starts a child that starts a grandchild (fsl_reg -> fnirt)
    w1 = workers("w1", 1)
    pids = deep_command(tmp_path, settings)
    assert len(alive(pids)) == 3
    # When the worker's main process, or the pool process running it, is SIGKILLed
    main = psutil.Process(w1.proc.pid)
    [pool] = [c for c in main.children() if c.pid not in pids]
    (main if victim == "main process" else pool).kill()
    # Then within 2 s no process of that tree remains
    assert gone(pids, timeout=2), f"left running: {alive(pids)}"


def test_a_lost_command_goes_to_the_front_of_a_long_queue(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], run_tag: str
) -> None:
    # Given node w1 running a command, and 500 others queued behind w2's one slot
    marks, log = Markers(tmp_path / "marks"), tmp_path / "log"
    w1 = workers("w1", 1)
    lost = api.submit(
        write_commands(tmp_path / "lost", [marked("lost", marks, log, "--sleep", "3")]),
        settings=settings,
    )
    wait_until(lambda: marks.starts("lost"), what="the command to start on w1")
    workers("w2", 1)
    others = [f"sleep 0.{i:04d} 1" for i in range(500)]
    queue = api.submit(write_commands(tmp_path / "others", others), settings=settings)
    # When w1 dies
    w1.signal(signal.SIGKILL)
    killed = time.time()
    wait_until(lambda: len(marks.starts("lost")) == 2, timeout=60, what="the rerun")
    # Then it runs again within LOST_AFTER + HEARTBEAT + one command (+ start-up slack),
    # ahead of the 500: not hours later at the back of the queue
    rerun = marks.starts("lost")[1].time
    assert rerun - killed < settings.lost_after + settings.heartbeat + 1.0 + 4.0
    assert api.status(queue.id, settings=settings).succeeded < 20
    final = api.wait(lost.id, settings=settings, timeout=60)
    assert final.succeeded == 1 and marks.counts(["lost"]) == {"lost": (2, 1)}
    api.cancel(queue.id, settings=settings)


def test_sigterm_in_a_loop_while_commands_finish_records_each_once(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker]
) -> None:
    # Given two nodes working through 100 short commands
    marks, log = Markers(tmp_path / "marks"), tmp_path / "log"
    nodes = {"w1": workers("w1", 2), "w2": workers("w2", 2)}
    ids = [str(i) for i in range(100)]
    lines = [marked(i, marks, log, "--sleep", "0.3") for i in ids]
    batch = api.submit(write_commands(tmp_path / "cmds", lines), settings=settings)
    # When SIGTERM hits w1's main process again and again (restarted whenever it exits)
    deadline = time.monotonic() + 180
    while not api.status(batch.id, settings=settings).done:
        assert time.monotonic() < deadline, "batch not done"
        w1 = nodes["w1"]
        if w1.proc.poll() is not None:
            nodes["w1"] = workers("w1", 2)
            continue
        for _ in range(3):
            if w1.proc.poll() is None:
                w1.proc.send_signal(signal.SIGTERM)
            time.sleep(0.1)
        time.sleep(1.0)
    # Then every command was recorded once and none ran twice
    final = api.status(batch.id, settings=settings)
    assert (final.succeeded, final.failed, final.queued, final.running) == (100, 0, 0, 0)
    marks.assert_exactly_once(ids)


def test_sigterm_while_a_finished_commands_record_is_written_loses_no_record(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker]
) -> None:
    # Given two commands about to finish on one node, while one Lua script keeps Redis busy for
    # 6 s, so that their records wait to be written (LOST_AFTER above the stall)
    marks, log = Markers(tmp_path / "marks"), tmp_path / "log"
    w1 = workers("w1", 2, env={"TBSS_QUEUE_LOST_AFTER": "20"})
    ids = ["a", "b"]
    lines = [marked(i, marks, log, "--sleep", "1.5") for i in ids]
    batch = api.submit(write_commands(tmp_path / "cmds", lines), settings=settings)
    wait_until(lambda: all(marks.starts(i) for i in ids), what="both commands running")
    client = redis.Redis.from_url(settings.broker, socket_timeout=30)
    stall = threading.Thread(target=client.eval, args=(BUSY_SCRIPT, 0, 6000))
    stall.start()
    try:
        wait_until(lambda: all(marks.dones(i) for i in ids), what="both commands done")
        time.sleep(0.5)  # their workers now wait for Redis to take the records
        # When SIGTERM reaches the pool processes writing those records
        pool = [
            c for c in psutil.Process(w1.proc.pid).children() if "guard" not in str(c.cmdline())
        ]
        signal_all([p.pid for p in pool], signal.SIGTERM)
    finally:
        stall.join()
    # Then both records land once Redis answers: nothing is run again
    final = api.wait(batch.id, settings=settings.with_(lost_after=20.0), timeout=90)
    assert (final.succeeded, final.failed, final.queued, final.running) == (2, 0, 0, 0)
    marks.assert_exactly_once(ids)


def test_concurrent_submits_of_one_file_and_a_retry_mid_batch_run_each_command_once(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], run_tag: str
) -> None:
    # Given a file whose two first commands fail until a flag exists
    marks, log, flag = Markers(tmp_path / "marks"), tmp_path / "log", tmp_path / "flag"
    ids = [str(i) for i in range(30)]
    lines = [marked(i, marks, log, "--fail-unless", str(flag)) for i in ids[28:]] + [
        marked(i, marks, log, "--sleep", "0.5") for i in ids[:28]
    ]
    cmds = write_commands(tmp_path / "cmds", lines)
    # When four submitters send it at the same moment (threads released by one barrier, so
    # every one plans before any commits)
    barrier = threading.Barrier(4)

    def submit_at_once() -> str:
        barrier.wait()
        return api.submit(cmds, settings=settings).id

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        ids_seen = set(pool.map(lambda _: submit_at_once(), range(4)))
    # Then they all name one batch, whose commands are queued once
    [batch] = api.list_batches(settings=settings)
    assert ids_seen == {batch.batch}
    assert (batch.total, batch.queued) == (30, 30)
    workers("w1", 2)
    wait_until(lambda: api.status(batch.batch, settings=settings).failed == 2, what="2 failures")
    # ... and the failed ones are retried while the rest still runs
    flag.touch()
    assert (
        api.status(batch.batch, settings=settings).queued
        + api.status(batch.batch, settings=settings).running
        > 0
    ), "the batch ended before the retry: make the commands longer"
    again = api.retry(batch.batch, settings=settings)
    assert again.queued == 2
    final = api.wait(batch.batch, settings=settings, timeout=120)
    # Then every command completed exactly once (the two fixed ones after one failed try)
    assert (final.succeeded, final.failed, final.total) == (30, 0, 30)
    marks.assert_exactly_once(ids, restarts=True)
    assert {i: len(marks.starts(i)) for i in ids} == {i: 1 if int(i) < 28 else 2 for i in ids}
    assert os.path.exists(log)


def test_a_frozen_pool_process_cannot_leave_its_command_running_past_its_lease(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker]
) -> None:
    # Given node w1 running a 20 s command
    marks, log = Markers(tmp_path / "marks"), tmp_path / "log"
    w1 = workers("w1", 1)
    batch = api.submit(
        write_commands(tmp_path / "cmds", [marked("a", marks, log, "--sleep", "20")]),
        settings=settings,
    )
    wait_until(lambda: marks.starts("a"), what="the command to start")
    old = marks.starts("a")[0].pid
    [pool] = [c for c in psutil.Process(w1.proc.pid).children() if c.pid != old]
    # When only its pool process freezes (the command, the guard and the worker go on)
    pool.suspend()
    try:
        workers("w2", 1)
        wait_until(lambda: len(marks.starts("a")) == 2, what="w2 to take the command over")
        # Then the guard killed the old copy before the lease could pass to w2
        rerun = marks.starts("a")[1].time
        assert not alive([old]), "the old copy still runs beside the new one"
    finally:
        pool.resume()
    final = api.wait(batch.id, settings=settings, timeout=60)
    assert (final.succeeded, final.failed) == (1, 0)
    assert marks.counts(["a"]) == {"a": (2, 1)} and marks.dones("a")[0].pid != old
    assert marks.dones("a")[0].time > rerun


def test_what_a_command_leaves_behind_dies_when_it_ends_even_outside_its_group_and_tag(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker]
) -> None:
    # Given a command that starts a daemon in a new session with an empty environment, and exits
    pidfile = tmp_path / "daemon"
    workers("w1", 1)
    code = (
        "import subprocess,sys; p=subprocess.Popen(['setsid','env','-i','sleep','600']); "
        f"open({str(pidfile)!r},'w').write(str(p.pid))"
    )
    batch = api.submit(
        write_commands(tmp_path / "cmds", [f'{sys.executable} -c "{code}"']), settings=settings
    )
    # When the command ends by itself
    final = api.wait(batch.id, settings=settings, timeout=60)
    assert final.succeeded == 1
    # Then nothing it started runs on
    wait_until(pidfile.exists, what="the daemon's pid")
    assert gone([int(pidfile.read_text())], timeout=2), "the daemon outlived its command"


def test_a_killed_guard_is_replaced_and_still_takes_the_tree_down_with_its_slot(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker]
) -> None:
    # Given a command with a child and a grandchild, whose slot's guard is SIGKILLed
    w1 = workers("w1", 1)
    pids = deep_command(tmp_path, settings)

    def guards() -> list[psutil.Process]:
        found = []
        for p in psutil.Process(w1.proc.pid).children(recursive=True):
            try:
                if "guard.py" in " ".join(p.cmdline()):
                    found.append(p)
            except psutil.Error:  # gone, or a zombie: not a guard at work
                pass
        return found

    [first] = guards()
    first.kill()
    wait_until(lambda: [g.pid for g in guards()] not in ([], [first.pid]), what="a new guard")
    time.sleep(2 * settings.heartbeat)  # the command is told to the new guard at a tick
    # When the worker's main process is SIGKILLed
    psutil.Process(w1.proc.pid).kill()
    # Then within 2 s no process of that tree remains
    assert gone(pids, timeout=2), f"left running: {alive(pids)}"


def test_a_claim_tried_again_after_its_reply_was_lost_still_owns_the_command(
    tmp_path: Path, settings: Settings
) -> None:
    # Given a queued command, claimed by a runner whose reply never arrived
    batch = api.submit(write_commands(tmp_path / "cmds", ["true"]), settings=settings)
    store = BatchStore(connect(settings))
    [task_id] = store.states(batch.id)
    assert store.claim(batch.id, task_id, "w1@h", "token-1", 60, 1)[0] == "ok"
    # When the same runner tries its claim again, and another runner tries too
    again = store.claim(batch.id, task_id, "w1@h", "token-1", 60, 1)
    other = store.claim(batch.id, task_id, "w2@h", "token-2", 60, 2)
    # Then the first still owns it (it runs the command, line 1, still its first attempt), the
    # other is told it is taken
    assert (again, other) == (("ok", 1, 1), ("busy", 0, 0))
    assert api.status(batch.id, settings=settings).running == 1
    assert store.renew(batch.id, task_id, "token-1", 60) == "ok"


def test_cancel_reaches_running_commands_at_once_not_at_their_next_renewal(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], run_tag: str
) -> None:
    # Given 4 commands running, each with a child, on a node renewing only every 30 s
    slow = {"TBSS_QUEUE_HEARTBEAT": "30", "TBSS_QUEUE_LOST_AFTER": "120"}
    workers("w1", 4, env=slow)
    marks, log, pidfile = Markers(tmp_path / "marks"), tmp_path / "log", tmp_path / "pids"
    ids = [str(i) for i in range(4)]
    lines = [
        marked(i, marks, log, "--sleep", "600", "--child", "--pidfile", str(pidfile)) for i in ids
    ]
    batch = api.submit(write_commands(tmp_path / "cmds", lines), settings=settings)
    wait_until(
        lambda: pidfile.exists() and len(pidfile.read_text().splitlines()) == 4,
        what="4 commands and their children running",
    )
    pids = [int(p) for p in pidfile.read_text().split()]
    assert len(alive(pids)) == 8
    # When the batch is cancelled from the command line
    env = {**settings_env(settings, run_tag), **slow}
    called = time.monotonic()
    res = tbss_queue("cancel", batch.id, "--yes", env=env)
    assert res.returncode == 0, res.stderr
    # Then every process tree is gone within 2 s of the call, start-up of the CLI included,
    # long before any runner's next renewal
    assert gone(pids, timeout=max(0.0, called + 2.0 - time.monotonic())), alive(pids)
    final = api.wait(batch.id, settings=settings, timeout=30)
    assert (final.cancelled, final.running, final.succeeded) == (4, 0, 0)
    assert marks.counts(ids) == {i: (1, 0) for i in ids}


def test_a_runner_held_between_claim_and_spawn_past_its_lease_starts_nothing(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], redis_server: RedisServer
) -> None:
    # Given node w1 behind a proxy that holds the reply to its first claim, which Redis has
    # carried out (a slow round trip between the claim and the spawn), and a command of 3 s
    marks, log = Markers(tmp_path / "marks"), tmp_path / "log"
    BatchStore(connect(settings)).load_scripts()  # so that its first EVALSHA is carried out
    claim = rb"EVALSHA\r\n\$40\r\n" + script_sha("claim").encode()
    with holding(redis_server.port, claim, reply=True) as proxy:
        workers("w1", 1, env={"TBSS_QUEUE_BROKER": proxy.url})
        line = marked("once", marks, log, "--sleep", "3")
        batch = api.submit(write_commands(tmp_path / "cmds", [line]), settings=settings)
        assert proxy.caught.wait(30), "w1 never claimed the command"
        # When its lease lapses meanwhile and node w2 takes the command over and starts it
        workers("w2", 1)
        wait_until(lambda: marks.starts("once"), what="w2 to start the command")
        # ... and only then does w1 get its reply
        proxy.release()
        final = api.wait(batch.id, settings=settings, timeout=60)
    # Then w1, finding its lease gone, starts nothing: one copy ran, on w2, once
    assert (final.succeeded, final.failed, final.queued, final.running) == (1, 0, 0, 0)
    assert marks.counts(["once"]) == {"once": (1, 1)}
    [record] = api.tasks(batch.id, settings=settings)
    assert record.node is not None and record.node.startswith("w2@")
    # and w1's log says so: it never ran the command, and says why
    w1_log = (tmp_path / "worker-w1-0.log").read_text()
    assert not [ln for ln in w1_log.splitlines() if f"batch {batch.id}, command " in ln]
    assert "not ours any more before starting" in w1_log


def test_a_lost_reply_to_a_hand_back_is_repaired_while_the_rest_of_the_batch_runs(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], redis_server: RedisServer
) -> None:
    # Given a node whose connection is cut right after Redis carries out its first hand-back
    # (a command given back for a retry), so that it never reads the reply
    marks, log, fixed = Markers(tmp_path / "marks"), tmp_path / "log", tmp_path / "fixed"
    BatchStore(connect(settings)).load_scripts()  # so that its first EVALSHA is carried out
    release = rb"EVALSHA\r\n\$40\r\n" + script_sha("release").encode()
    with holding(redis_server.port, release, drop=True) as proxy:
        workers("w1", 2, env={"TBSS_QUEUE_BROKER": proxy.url})
        # And a batch with a long command and one that fails once, with a retry allowed
        lines = [
            marked("long", marks, log, "--sleep", "25"),
            marked("flaky", marks, log, "--fail-unless", str(fixed)),
        ]
        cmds = write_commands(tmp_path / "cmds", lines)
        batch = api.submit(cmds, settings=settings, retries=1)
        # When the flaky command fails and the reply to its hand-back is lost
        assert proxy.caught.wait(30), "the flaky command was never handed back"
        fixed.write_text("")
        # Then its retry still comes, while the long command of its batch runs
        wait_until(lambda: marks.dones("flaky"), timeout=30, what="the retry to complete")
        assert not marks.dones("long")
        final = api.wait(batch.id, settings=settings, timeout=90)
    # And every command completed once
    assert (final.succeeded, final.failed, final.queued) == (2, 0, 0)
    assert marks.counts(["long", "flaky"]) == {"long": (1, 1), "flaky": (2, 1)}


def test_a_long_stall_before_the_spawn_does_not_let_celerys_hard_limit_cut_the_command_short(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], redis_server: RedisServer
) -> None:
    # Given a node whose claim Redis carries out but whose reply stalls for 62 s (the one
    # round trip between the delivery and the spawn), with LOST_AFTER above the stall so that
    # the claim stays its own
    marks, log = Markers(tmp_path / "marks"), tmp_path / "log"
    BatchStore(connect(settings)).load_scripts()  # so that its first EVALSHA is carried out
    claim = rb"EVALSHA\r\n\$40\r\n" + script_sha("claim").encode()
    slow = {"TBSS_QUEUE_HEARTBEAT": "10", "TBSS_QUEUE_LOST_AFTER": "120"}
    with holding(redis_server.port, claim, reply=True) as proxy:
        workers("w1", 1, env={**slow, "TBSS_QUEUE_BROKER": proxy.url})
        # And a command with a time limit of 10 s that takes 9 s
        line = marked("late", marks, log, "--sleep", "9")
        cmds = write_commands(tmp_path / "cmds", [line])
        batch = api.submit(cmds, settings=settings.with_(time_limit=10))
        assert proxy.caught.wait(30), "w1 never claimed the command"
        # When the stall ends 62 s after the command's delivery
        time.sleep(62)
        proxy.release()
        final = api.wait(batch.id, settings=settings.with_(lost_after=120.0), timeout=90)
    # Then the command, started late, ran its 9 s whole: its own limit counts from its spawn,
    # and Celery's hard limit (from the delivery) did not kill it; it ran once
    assert (final.succeeded, final.failed, final.queued, final.running) == (1, 0, 0, 0)
    assert marks.counts(["late"]) == {"late": (1, 1)}
