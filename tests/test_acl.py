"""One Redis user per role, each with what it needs and nothing @dangerous (issue 27, point 9).

A real redis-server loads deploy/users.acl as deploy/redis-acl.sh renders it from secret files;
a real worker runs as tbss-work, submit as tbss-submit, status as tbss-watch; then each role
is tried at what it must not do.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tbss_queue import api
from tbss_queue.config import Settings
from tbss_queue.redis_server import free_port

from .conftest import Worker, write_commands
from .test_deploy import REPO, acl_env, redis_7, write_secrets

ROLES = ("submit", "work", "watch")


@pytest.fixture
def acl_redis(tmp_path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """A redis-server with the shipped config and users; (port, role -> password)."""
    secrets = write_secrets(tmp_path / "secrets")
    acl = tmp_path / "users.acl"
    subprocess.run(
        ["sh", str(REPO / "deploy" / "redis-acl.sh"), "true"],
        env={**os.environ, **acl_env(secrets, acl)},
        check=True,
    )
    port = free_port()
    (tmp_path / "data").mkdir()
    proc = subprocess.Popen(
        [redis_7(), str(REPO / "deploy" / "redis.conf"), "--aclfile", str(acl), "--port",
         str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path / "data")],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    passwords = {r: (secrets / f"redis-{r}").read_text().strip() for r in ROLES}
    try:
        probe = redis.Redis(port=port, username="tbss-watch", password=passwords["watch"])
        for _ in range(100):
            try:
                probe.ping()
                break
            except redis.ConnectionError:
                assert proc.poll() is None, "redis-server refused deploy/users.acl"
                time.sleep(0.05)
        yield port, passwords
    finally:
        proc.terminate()
        proc.wait(10)


def test_each_role_does_its_job_and_nothing_more(
    tmp_path: Path, acl_redis: tuple[int, dict[str, str]], workers: Callable[..., Worker]
) -> None:
    port, passwords = acl_redis

    def url(role: str) -> str:
        return f"redis://tbss-{role}:{passwords[role]}@127.0.0.1:{port}/0"

    def client(role: str) -> redis.Redis:
        return redis.Redis(port=port, username=f"tbss-{role}", password=passwords[role])

    # Given a worker as tbss-work
    workers("w1", 1, "--allow", "touch", env={"TBSS_QUEUE_BROKER": url("work")})
    # When tbss-submit submits a batch and tbss-watch follows it
    submit = Settings.resolve(env={}, broker=url("submit"))
    watch = Settings.resolve(env={}, broker=url("watch"))
    batch = api.submit(write_commands(tmp_path / "cmds", ["touch ran"]), settings=submit)
    assert api.wait(batch.id, settings=watch, timeout=60).succeeded == 1
    assert (tmp_path / "ran").exists()
    assert [f.line for f in api.failures(batch.id, settings=watch)] == []
    # Then tbss-watch can read but neither queue a command, nor reset a record (a replay
    # needs both), not even from a script
    seen = client("watch")
    assert seen.llen("tbss-queue") == 0 and seen.hgetall(f"tbssq:b:{batch.id}:state")
    for attempt in (
        lambda: seen.lpush("tbss-queue", "{}"),
        lambda: seen.hset(f"tbssq:b:{batch.id}:state", "x", "queued"),
        lambda: seen.eval("return redis.call('del', KEYS[1])", 1, "tbssq:batches"),
    ):
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()
    # tbss-submit takes no message off the queue by a blocking pop and hears no pub/sub
    queued = client("submit")
    with pytest.raises(redis.exceptions.NoPermissionError):
        queued.brpop(["tbss-queue"], timeout=1)
    with pytest.raises(redis.exceptions.NoPermissionError):
        queued.publish("/0.celery.pidbox", "{}")
    with pytest.raises(redis.exceptions.NoPermissionError):
        queued.hset("unacked", "x", "{}")
    # but it cancels a batch, nudging its runners on the one channel it may publish to
    assert api.cancel(batch.id, settings=submit).succeeded == 1
    queued.publish("tbssq:cancelled", batch.id)
    # no role has anything @dangerous (INFO alone is granted back)
    for role in ROLES:
        c = client(role)
        assert "redis_version" in c.info("server")
        for command in (
            ("FLUSHALL",),
            ("CONFIG", "SET", "appendonly", "no"),
            ("KEYS", "*"),
            ("ACL", "LIST"),
            ("REPLICAOF", "NO", "ONE"),
            ("SCRIPT", "FLUSH"),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                c.execute_command(*command)
    # and nobody gets in without a user and its password
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(port=port).ping()
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(port=port, username="tbss-work", password=passwords["watch"]).ping()
