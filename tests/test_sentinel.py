"""High availability with Redis's own tools: a `sentinel://` broker, followed across a failover.

Real processes on free loopback ports in tmp dirs, always stopped: a redis-server master, a
replica of it (`--replicaof`), one Sentinel (`redis-server --sentinel`, quick to judge the
master down), real `tbss-queue worker` nodes, `submit --wait`, `doctor` and Flower, all given
only the Sentinel's address. The master is SIGKILLed mid-batch; every command must still
complete exactly once by its marker file, with no two copies running at once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tbss_queue import api
from tbss_queue.config import Settings
from tbss_queue.queue.broker import REPLICA_WAIT_MS, connect, replicated
from tbss_queue.queue.persistence import epoch, lost_batch_message, persistence, server_run_id
from tbss_queue.redis_server import RedisServer, find_redis_server, free_port

from .conftest import Worker, settings_env, tbss_queue, write_commands
from .faults import Markers, job, wait_until
from .test_flower import fetch, flower, workers_seen

MASTER = "tbssmaster"
DOWN_AFTER_MS = 1000
"""Sentinel's down-after-milliseconds: the master counts as down after 1 s without a reply."""
FAILOVER_TIMEOUT_MS = 4000


class Sentinel:
    """One `redis-server --sentinel` process watching `master_port` under the name MASTER."""

    def __init__(self, data: Path, master_port: int | None, auth: str, password: str) -> None:
        self.data, self.port, self.password = data, free_port(), password
        data.mkdir(parents=True, exist_ok=True)
        lines = [
            f"port {self.port}",
            "bind 127.0.0.1",
            f"dir {data}",
            f"logfile {data / 'sentinel.log'}",
            f"requirepass {password}",
        ]
        if master_port is not None:
            lines += [
                f"sentinel monitor {MASTER} 127.0.0.1 {master_port} 1",
                f"sentinel auth-pass {MASTER} {auth}",
                f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}",
                f"sentinel failover-timeout {MASTER} {FAILOVER_TIMEOUT_MS}",
            ]
        self.conf = data / "sentinel.conf"  # Sentinel rewrites it: a file of its own
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Sentinel:
        self.proc = subprocess.Popen(
            [find_redis_server(), str(self.conf), "--sentinel"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_until(self._answers, 10, "Sentinel to answer")
        return self

    def _answers(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, self.log()
        try:
            return bool(self.client().ping())
        except redis.ConnectionError:
            return False

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, password=self.password, decode_responses=True)

    def master_port(self) -> int:
        return int(self.client().sentinel_get_master_addr_by_name(MASTER)[1])

    def replicas(self) -> list[dict[str, object]]:
        return [
            r
            for r in self.client().sentinel_slaves(MASTER)
            if not (r["is_sdown"] or r["is_odown"] or r["is_disconnected"])
        ]

    def log(self) -> str:
        path = self.data / "sentinel.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class Group:
    """A master, its replica and a Sentinel watching them; every process stopped at the end."""

    def __init__(self, tmp: Path) -> None:
        self.auth = "master-" + os.urandom(6).hex()
        self.sentinel_password = "sentinel-" + os.urandom(6).hex()
        self.master = self._server(tmp / "master", [])
        self.replica = self._server(tmp / "replica", ["--replicaof", "127.0.0.1", ""])
        self.sentinel = Sentinel(
            tmp / "sentinel", self.master.port, self.auth, self.sentinel_password
        )

    def _server(self, data: Path, extra: list[str]) -> RedisServer:
        # as deploy/redis.conf: AOF on; masterauth so that any of them can follow another
        args = ["--masterauth", self.auth, *extra]
        return RedisServer(
            data, port=free_port(), persistent=True, password=self.auth, extra_args=args
        )

    def start(self) -> Group:
        self.master.start()
        self.replica.extra_args[-1] = str(self.master.port)
        self.replica.start()
        self.sentinel.start()
        wait_until(lambda: len(self.sentinel.replicas()) == 1, 30, "Sentinel to see the replica")
        wait_until(self._in_sync, 30, "the replica to be in sync")
        return self

    def _in_sync(self) -> bool:
        info = self._client(self.replica).info("replication")
        return info.get("master_link_status") == "up"

    def _client(self, server: RedisServer) -> redis.Redis:
        return redis.Redis(port=server.port, password=self.auth, decode_responses=True)

    @property
    def url(self) -> str:
        return f"sentinel://:{self.auth}@127.0.0.1:{self.sentinel.port}/0"

    def stop(self) -> None:
        self.sentinel.stop()
        self.replica.stop()
        self.master.stop()


@pytest.fixture
def group(tmp_path: Path) -> Iterator[Group]:
    g = Group(tmp_path / "redis")
    try:
        yield g.start()
    finally:
        g.stop()


@pytest.fixture
def settings(group: Group) -> Settings:
    """This module's broker: the Sentinel's address only (conftest's `workers` use it).

    LOST_AFTER 12 s: a runner kills its command after 10 s without a renewal, longer than the
    failover, so that no command is killed by the failover itself."""
    return Settings.resolve(
        env={},
        broker=group.url,
        sentinel_master=MASTER,
        sentinel_password=group.sentinel_password,
        heartbeat=1.0,
        lost_after=12.0,
    )


def no_overlap(marks: Markers, cid: str) -> bool:
    """No two copies of `cid` ran at once: each copy that started ended before the next one."""
    spans: dict[int, list[float]] = {}
    for m in marks.of(cid):
        spans.setdefault(m.pid, []).append(m.time)
    ordered = sorted((min(t), max(t)) for t in spans.values())
    return all(
        a_end <= b_start for (_, a_end), (b_start, _) in zip(ordered, ordered[1:], strict=False)
    )


def doctor(env: dict[str, str]) -> dict[str, dict[str, object]]:
    res = tbss_queue("doctor", "--json", env=env)
    return {c["name"]: c for c in json.loads(res.stdout)}


def test_a_sentinel_failover_mid_batch_runs_every_command_exactly_once(
    tmp_path: Path,
    group: Group,
    settings: Settings,
    workers: Callable[..., Worker],
    run_tag: str,
) -> None:
    # Given two worker nodes and a submitter that know only the Sentinel
    env = settings_env(settings, run_tag)
    before = doctor(env)
    assert f"master {MASTER} at 127.0.0.1:{group.master.port}" in str(before["broker"]["detail"])
    assert before["replicas"]["detail"] == f"127.0.0.1:{group.replica.port}"
    assert before["failover"]["ok"] is True, before["failover"]
    # with the default LOST_AFTER (60 s) and Sentinel's default down-after (30 s) it would pass
    # too; with LOST_AFTER 8 s the 1 s down-after leaves too little time for the failover
    tight = doctor({**env, "TBSS_QUEUE_LOST_AFTER": "8"})["failover"]
    assert tight["ok"] is False and "down-after-milliseconds" in str(tight["fix"])
    workers("w1", 2)
    workers("w2", 2)
    old_run_id = server_run_id(connect(settings))
    marks, log = Markers(tmp_path / "marks"), tmp_path / "log"
    ids = [str(i) for i in range(24)]
    lines = [job(i, log, "--marker", str(marks.dir), "--sleep", "2") for i in ids]
    cmds = write_commands(tmp_path / "cmds", lines)
    with open(tmp_path / "submit.log", "wb") as out:
        submit = subprocess.Popen(
            [sys.executable, "-m", "tbss_queue", "submit", str(cmds), "--wait"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        # When the master is SIGKILLed mid-batch, with four commands running
        wait_until(lambda: sum(bool(marks.dones(i)) for i in ids) >= 4, 60, "4 commands done")
        wait_until(
            lambda: sum(bool(marks.starts(i)) and not marks.dones(i) for i in ids) == 4,
            30,
            "4 commands running",
        )
        killed = time.monotonic()
        group.master.kill()
        # Then Sentinel promotes the replica within a few seconds
        wait_until(
            lambda: group.sentinel.master_port() == group.replica.port,
            30,
            "Sentinel to promote the replica",
        )
        failover = time.monotonic() - killed
        print(f"failover: replica promoted {failover:.1f} s after the master was killed")
        # and submit --wait follows it and exits 0 when every command has run
        assert submit.wait(180) == 0, (tmp_path / "submit.log").read_text()
    finally:
        if submit.poll() is None:
            os.killpg(submit.pid, signal.SIGKILL)
            submit.wait(10)
    assert failover < 15, group.sentinel.log()
    # every command completed exactly once by its marker file, no two copies at once
    marks.assert_exactly_once(ids)
    assert all(no_overlap(marks, i) for i in ids)
    final = api.status(settings=settings)
    assert (final.succeeded, final.failed, final.queued, final.running) == (24, 0, 0, 0)
    # a new run_id, the same data: the batch is not taken for lost in a restart, even once the
    # new master is told to keep nothing on disk (it kept the data by replication)
    client = connect(settings)
    assert server_run_id(client) != old_run_id and epoch(client) == old_run_id
    client.config_set("appendonly", "no")
    client.config_set("save", "")
    state = persistence(client)
    assert state.promoted and state.durable is False
    for known in (old_run_id, "0" * 40, None):
        assert lost_batch_message(client, final.batch, known) is None
        assert lost_batch_message(client, "0badbeef", known) is None
    # doctor names the new master, and warns that it has no replica left
    after = doctor(env)
    assert f"127.0.0.1:{group.replica.port}" in str(after["broker"]["detail"])
    assert after["replicas"]["ok"] is True
    assert str(after["replicas"]["detail"]).startswith("none")
    # and Flower, given the same Sentinel, lists both nodes and the queue of the new master
    with flower(env, tmp_path, "--db", str(tmp_path / "flower.db")) as base:
        wait_until(lambda: workers_seen(base) == {"w1", "w2"}, 60, "Flower to see both workers")
        assert settings.queue in fetch(base + "/broker")


def test_replicated_waits_for_the_replica_and_gives_up_without_one(
    group: Group, settings: Settings
) -> None:
    client = connect(settings)
    client.set("tbssq:test", "1")
    # with the replica following: confirmed (one round trip more per claim and finish)
    assert replicated(client, settings) is True
    assert replicated(client, Settings.resolve(env={}, broker="redis://127.0.0.1:1/0")) is None
    assert group.replica.proc is not None
    os.kill(group.replica.proc.pid, signal.SIGSTOP)
    try:
        # a write the master acknowledged but the stopped replica cannot have
        client.set("tbssq:test", "2")
        started = time.monotonic()
        assert replicated(client, settings) is False
        assert time.monotonic() - started >= REPLICA_WAIT_MS / 1000 * 0.9
        # and then it stops waiting for a while, rather than slow every claim down
        started = time.monotonic()
        assert replicated(client, settings) is None
        assert time.monotonic() - started < 0.1
    finally:
        os.kill(group.replica.proc.pid, signal.SIGCONT)


@pytest.fixture
def bare_sentinel(tmp_path: Path) -> Iterator[Sentinel]:
    """A Sentinel that watches no master at all."""
    sentinel = Sentinel(tmp_path / "sentinel", None, "", "s3cret").start()
    try:
        yield sentinel
    finally:
        sentinel.stop()


def one_line_error(*args: str, code: int) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TBSS_QUEUE_")}
    res = tbss_queue(*args, env=env, timeout=60)
    assert res.returncode == code, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tbss-queue: error: "), res.stderr
    return lines[0]


def test_a_bad_sentinel_url_or_master_name_is_one_line_and_a_non_zero_exit(
    bare_sentinel: Sentinel,
) -> None:
    port = bare_sentinel.port
    # a URL that is not a list of sentinel://HOST:PORT: a usage error (2), password masked
    line = one_line_error("status", "--broker", "sentinel://:pw@h:1;redis://h:2", code=2)
    assert "each part must be sentinel://HOST:PORT" in line and ":pw@" not in line
    line = one_line_error("status", "--broker", "sentinel://h:26379?master=x", code=2)
    assert "--sentinel-master" in line
    # TLS is refused rather than half applied
    line = one_line_error("status", "--broker", "sentinel://h:1", "--tls-insecure", code=2)
    assert "TLS is not supported with a sentinel:// broker" in line
    # no Sentinel answers there: broker unreachable (3)
    line = one_line_error("status", "--broker", f"sentinel://127.0.0.1:{free_port()}", code=3)
    assert "no Sentinel of sentinel://127.0.0.1:" in line
    # a Sentinel that wants a password, and one given the wrong one
    url = f"sentinel://127.0.0.1:{port}"
    line = one_line_error("status", "--broker", url, code=3)
    assert line.endswith(
        "needs a password: give --sentinel-password / TBSS_QUEUE_SENTINEL_PASSWORD"
    )
    line = one_line_error("status", "--broker", url, "--sentinel-password", "nope", code=3)
    assert f"Sentinel 127.0.0.1:{port} refused the password" in line and "nope" not in line
    # a master name the Sentinel does not know; the same from doctor and worker
    for verb in ("status", "doctor", "worker"):
        args = (verb, "--broker", url, "--sentinel-password", "s3cret", "--sentinel-master", "nope")
        if verb == "doctor":
            res = tbss_queue(*args, env={k: v for k, v in os.environ.items()}, timeout=60)
            assert res.returncode == 1 and "know no master named 'nope'" in res.stdout
            continue
        line = one_line_error(*args, code=3)
        assert line == (
            f"tbss-queue: error: the Sentinels of {url} know no master named 'nope' (they know: "
            "none); set --sentinel-master / TBSS_QUEUE_SENTINEL_MASTER"
        )
