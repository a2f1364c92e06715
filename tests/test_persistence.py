"""A broker without persistence is reported, and a batch it lost in a restart is named as lost
(exit 4) instead of looking like a mistyped id."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tbss_queue import api
from tbss_queue.config import Settings
from tbss_queue.errors import BatchNotFound, TbssQueueError
from tbss_queue.queue.batches import BatchStore
from tbss_queue.queue.keys import BATCHES
from tbss_queue.queue.persistence import (
    EXIT_LOST,
    BatchLost,
    epoch,
    lost_batch_message,
    lost_or_not_found,
    persistence,
    persistence_warning,
    remember,
    server_run_id,
)
from tbss_queue.redis_server import RedisServer, free_port

from .conftest import write_commands

WARNING = (
    "the broker keeps its data in memory only (no AOF, no RDB): a Redis restart loses every "
    "queued command; enable appendonly yes (deploy/redis.conf does)"
)


def lost(batch_id: str) -> str:
    return (
        f"the broker restarted without persistence: batch {batch_id} was lost; resubmit the "
        "file; done fsl_reg pairs are skipped by their outputs"
    )


class Broker:
    """A private redis-server that can be restarted on the same port and data directory."""

    def __init__(self, data: Path, persistent: bool, extra_args: list[str] | None = None) -> None:
        self.data, self.persistent, self.extra_args = data, persistent, extra_args
        self.port = free_port()
        self.server: RedisServer | None = None

    def start(self) -> redis.Redis:
        self.server = RedisServer(
            self.data, port=self.port, persistent=self.persistent, extra_args=self.extra_args
        ).start()
        return redis.Redis.from_url(self.server.url, decode_responses=True)

    def restart(self) -> redis.Redis:
        self.stop()
        return self.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    """Factory: broker(persistent, extra_args) -> a Broker, stopped after the test."""
    started: list[Broker] = []

    def make(persistent: bool, extra_args: list[str] | None = None) -> Broker:
        b = Broker(tmp_path / f"redis-{len(started)}", persistent, extra_args)
        started.append(b)
        return b

    yield make
    for b in started:
        b.stop()


def commit(client: redis.Redis, batch_id: str) -> None:
    """What a submit leaves behind, as far as these checks read it."""
    remember(client)
    client.zadd(BATCHES, {batch_id: 1.0})


@pytest.mark.parametrize(
    ("persistent", "extra", "save", "aof", "rdb", "durable"),
    [
        (False, [], None, False, False, False),
        (True, [], None, True, False, True),
        (False, [], "60 1", False, True, True),  # RDB snapshots only
        # managed Redis often refuses CONFIG: RDB unknown, so durability unknown, no warning
        (False, ["--rename-command", "CONFIG", ""], None, False, None, None),
    ],
)
def test_persistence_reads_aof_and_rdb(
    broker: Callable[..., Broker],
    persistent: bool,
    extra: list[str],
    save: str | None,
    aof: bool,
    rdb: bool | None,
    durable: bool | None,
) -> None:
    client = broker(persistent, extra).start()
    if save is not None:  # RedisServer always starts with --save ""
        client.config_set("save", save)
    state = persistence(client)
    assert (state.aof, state.rdb, state.durable) == (aof, rdb, durable)
    assert state.run_id == server_run_id(client) and len(state.run_id) == 40
    assert persistence_warning(client) == (WARNING if durable is False else None)


def test_session_broker_without_persistence_is_not_durable(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)  # bytes replies work as well
    assert persistence(client).durable is False
    assert persistence_warning(client) == WARNING


def test_unknown_id_on_a_live_broker_with_data_is_plain_not_found(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    commit(client, "3f2a0c1d")
    run_id = server_run_id(client)
    assert epoch(client) == run_id
    remember(client)  # never overwritten
    assert epoch(client) == run_id
    for known in (None, run_id):
        assert lost_batch_message(client, "3f2a0c1d", known) is None
        assert lost_batch_message(client, "3f2a", known) is None  # a prefix of a batch
        assert lost_batch_message(client, "deadbeef", known) is None
    with pytest.raises(BatchNotFound) as info:
        BatchStore(client).resolve_id("deadbeef")
    err = lost_or_not_found(client, "deadbeef", None, info.value)
    assert err is info.value and err.exit_code == 2


def test_restart_without_persistence_names_the_lost_batch(
    tmp_path: Path, broker: Callable[..., Broker]
) -> None:
    b = broker(False)
    client = b.start()
    assert b.server is not None
    settings = Settings.resolve(env={}, broker=b.server.url)
    batch = api.submit(write_commands(tmp_path / "cmds", ["true a", "true b"]), settings=settings)
    remember(client)  # what submit will do
    known = server_run_id(client)
    assert lost_batch_message(client, batch.id, known) is None

    client = b.restart()
    assert server_run_id(client) != known and epoch(client) is None
    # a caller that saw the batch (submit --wait) knows it was lost
    assert lost_batch_message(client, batch.id, known) == lost(batch.id)
    with pytest.raises(BatchNotFound) as info:
        BatchStore(client).resolve_id(batch.id)
    err = lost_or_not_found(client, batch.id, known, info.value)
    assert isinstance(err, BatchLost) and isinstance(err, TbssQueueError)
    assert str(err) == lost(batch.id) and err.exit_code == EXIT_LOST == 4
    # a caller holding only the id (`status ID`): an empty in-memory broker cannot tell a
    # lost batch from one never submitted, so it says so with an "if"
    guess = lost_batch_message(client, batch.id, None)
    assert guess is not None and f"if {batch.id} was submitted here a Redis restart lost" in guess
    assert "no AOF, no RDB" in guess and guess.endswith("skipped by their outputs")
    # someone submits again after the restart: the new mark is the new process's run_id
    commit(client, "0a1b2c3d")
    assert lost_batch_message(client, batch.id, known) == lost(batch.id)
    assert lost_batch_message(client, batch.id, None) is None  # now just an unknown id


def test_restart_with_aof_keeps_the_batch(broker: Callable[..., Broker]) -> None:
    b = broker(True)
    client = b.start()
    assert lost_batch_message(client, "deadbeef", None) is None  # durable, never had batches
    commit(client, "3f2a0c1d")
    known = server_run_id(client)

    client = b.restart()
    assert server_run_id(client) != known and epoch(client) == known  # restarted, data kept
    assert client.zscore(BATCHES, "3f2a0c1d") is not None
    assert lost_batch_message(client, "3f2a0c1d", known) is None
    # the mark survived the restart: an unknown id is a wrong id, whoever asks
    assert lost_batch_message(client, "deadbeef", known) is None
    assert lost_batch_message(client, "deadbeef", None) is None
