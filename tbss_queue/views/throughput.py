"""Commands finished per minute over time, overall and per node, from our records in Redis.

The end times come from each batch's `b:B:ended` ZSET and the node from its result record, so
the figures are those of `status` and the report, whatever Flower saw (Flower's in-memory
state starts empty when it restarts and counts attempts, not commands).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from tbss_queue.queue.batches import BatchStore
from tbss_queue.queue.keys import CHUNK, batch_key

NICE_BINS = (5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600)
"""Bin widths (seconds) a chart may use: about 40 bins over what it shows."""
TARGET_BINS = 40
PER_BIN = 4
"""Ends a bin holds on average, at least: fewer, and a bar is one command's end times 60."""


def bin_count(ends: int, most: int = TARGET_BINS) -> int:
    """How many bins a chart of `ends` commands may have: so many that the bars show how the
    rate changed, so few that each holds a few ends (a 16-command batch: 4 bins, not 60 bars
    of 150/min for the seconds where three commands ended)."""
    return max(1, min(most, ends // PER_BIN))


@dataclass(frozen=True)
class Throughput:
    """Commands ended per bin, the bins ending at `now` (the newest is whole)."""

    now: float
    bin_seconds: int
    batches: tuple[str, ...]
    live: bool  # False: no batch is running, these are the latest batch's figures
    overall: tuple[int, ...] = ()
    nodes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def start(self) -> float:
        return self.now - self.bin_seconds * len(self.overall)

    @property
    def total(self) -> int:
        return sum(self.overall)

    def per_minute(self, counts: tuple[int, ...]) -> list[float]:
        return [c * 60.0 / self.bin_seconds for c in counts]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            start=self.start,
            total=self.total,
            overall_per_minute=self.per_minute(self.overall),
            nodes_per_minute={n: self.per_minute(c) for n, c in self.nodes.items()},
        )
        return d


def _bin_width(span: float, ends: int) -> int:
    return next((b for b in NICE_BINS if b * bin_count(ends) >= span), NICE_BINS[-1])


def _ended_since(store: BatchStore, batch_id: str, since: float) -> list[tuple[str, float]]:
    """(command, end time) of a batch's commands that ended since `since`, read by rank a
    chunk at a time: a fast study ends a million in an hour, and one ZRANGEBYSCORE returning
    them all would hold up every worker."""
    key = batch_key(batch_id, "ended")
    first = int(store.r.zcount(key, "-inf", f"({since}"))
    ended: dict[str, float] = {}  # a command retried meanwhile moves to the end: once
    while page := store.r.zrange(key, first, first + CHUNK - 1, withscores=True):
        ended.update({str(t): float(at) for t, at in page})
        first += len(page)
    return list(ended.items())


def throughput(store: BatchStore, minutes: float = 60.0) -> Throughput:
    """The live batches' throughput over the last `minutes` (or since their first command
    ended, if later); with no live batch, the latest batch's."""
    now = store.redis_time()
    live = sorted(store.active())
    batches = live or store.batch_ids()[-1:]
    ends: list[tuple[float, str]] = []
    for b in batches:
        ended = _ended_since(store, b, now - 60 * minutes)
        ids = [str(t) for t, _ in ended]
        nodes: dict[str, str] = {}
        for i in range(0, len(ids), CHUNK):
            part = ids[i : i + CHUNK]
            records = store.results(b, part)
            nodes.update({t: str(records[t].get("node") or "?") for t in part if t in records})
        ends += [(float(t), nodes.get(str(tid), "?")) for tid, t in ended]
    if not ends:
        return Throughput(now, NICE_BINS[0], tuple(batches), bool(live))
    if not live:  # an ended batch: its bins end at its last command, not at now
        now = max(t for t, _ in ends)
    span = now - min(t for t, _ in ends)
    width = _bin_width(span, len(ends))
    n = max(1, math.ceil(span / width) + 1)
    overall = [0] * n
    per_node: dict[str, list[int]] = {}
    for t, node in ends:
        i = min(n - 1, max(0, n - 1 - int((now - t) // width)))
        overall[i] += 1
        per_node.setdefault(node, [0] * n)[i] += 1
    return Throughput(
        now,
        width,
        tuple(batches),
        bool(live),
        tuple(overall),
        {k: tuple(v) for k, v in sorted(per_node.items())},
    )
