"""The throughput figures Flower's page shows, read from our records on a real redis-server:
exact counts per node, read a bounded chunk at a time however many commands ended."""

from __future__ import annotations

import json

from tbss_queue.config import Settings
from tbss_queue.queue.batches import BatchStore
from tbss_queue.queue.broker import connect
from tbss_queue.queue.keys import ACTIVE, CHUNK, batch_key
from tbss_queue.views.throughput import throughput


def test_an_hour_of_many_ended_commands_is_counted_exactly_in_bounded_reads(
    redis_url: str,
) -> None:
    client = connect(Settings.resolve(env={}, broker=redis_url))
    store = BatchStore(client)
    now = store.redis_time()
    # Given a live batch with 5,000 commands ended in the last 50 minutes on 4 nodes,
    # and 300 that ended two hours ago
    n, old = 5000, 300
    ended = {f"t{i}": now - 3000 + i * 0.5 for i in range(n)}
    ended |= {f"old{i}": now - 7200 - i for i in range(old)}
    client.zadd(batch_key("b1", "ended"), ended)
    records = {t: json.dumps({"node": f"w{i % 4}@host"}) for i, t in enumerate(ended)}
    client.hset(batch_key("b1", "result"), mapping=records)
    client.sadd(ACTIVE, "b1")
    client.config_resetstat()
    # When the page's figures are read
    figures = throughput(store, minutes=60)
    # Then every command of the hour is counted once, on its node
    assert figures.live and figures.batches == ("b1",)
    assert figures.total == n
    assert {node: sum(c) for node, c in figures.nodes.items()} == {
        f"w{k}@host": n // 4 for k in range(4)
    }
    # And Redis was asked for them a chunk at a time, never for the whole hour in one reply
    stats = client.info("commandstats")
    assert "cmdstat_zrangebyscore" not in stats
    assert stats["cmdstat_zrange"]["calls"] == -(-n // CHUNK) + 1
