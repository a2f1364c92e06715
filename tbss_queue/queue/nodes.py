"""The worker nodes as Redis knows them: heartbeats, stops, quarantine, faults, late
renewals and the facts each announced."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from tbss_queue.models import Fleet
from tbss_queue.queue.keys import (
    ALIVE,
    FAULTS,
    LATE,
    NODES,
    PAUSED,
    QUARANTINE,
    STOPPING,
)
from tbss_queue.queue.store import Store


class Nodes(Store):
    """The worker nodes as Redis knows them."""

    def alive(self, node: str, *, stopping: bool = False) -> None:
        """Say this node is up (Redis's clock: hosts' clocks may disagree), and whether it is
        stopping (up, taking no new command)."""
        self._run("alive", [ALIVE, STOPPING], [node, int(stopping)])

    def gone(self, node: str) -> None:
        """This node is stopping: it no longer counts as taking commands (nor beats)."""
        pipe = self.r.pipeline(transaction=False)
        pipe.zrem(ALIVE, node)
        pipe.hset(STOPPING, node, self.redis_time())
        pipe.execute()

    def fleet(self, lost_after: float, now: float | None = None) -> Fleet:
        """The nodes' health at Redis time `now` (default: asked): heartbeats, stop marks and
        quarantine, in one round trip."""
        pipe = self.r.pipeline(transaction=False)
        pipe.zrange(ALIVE, 0, -1, withscores=True)
        pipe.hgetall(STOPPING)
        pipe.hgetall(QUARANTINE)
        pipe.hgetall(FAULTS)
        pipe.hgetall(PAUSED)
        beats, stopping, quarantine, faults, paused = pipe.execute()
        cannot: dict[str, list[str]] = {}
        for key, raw in faults.items():
            cannot.setdefault(str(key).partition("|")[0], []).append(json.loads(raw)["message"])
        return Fleet(
            now=self.redis_time() if now is None else now,
            lost_after=lost_after,
            heartbeats={str(n): float(t) for n, t in beats},
            stopping={str(n): float(t) for n, t in stopping.items()},
            quarantine={str(n): json.loads(v)["message"] for n, v in quarantine.items()},
            faults={n: tuple(sorted(m)) for n, m in cannot.items()},
            paused={str(n): json.loads(v)["reason"] for n, v in paused.items()},
        )

    def live_nodes(self, window: float) -> list[str]:
        now = self.redis_time()
        return [str(n) for n in self.r.zrangebyscore(ALIVE, now - window, "+inf")]

    def quarantined(self, node: str | None = None) -> dict[str, dict[str, Any]]:
        """node -> why it takes no commands: every quarantined node, or the one named."""
        if node is not None:
            raw = self.r.hget(QUARANTINE, node)
            return {node: json.loads(raw)} if raw else {}
        return {n: json.loads(v) for n, v in self.r.hgetall(QUARANTINE).items()}

    def release_node(self, node: str) -> bool:
        """Let a quarantined node take commands again, its count of late renewals cleared;
        False if it was not quarantined."""
        pipe = self.r.pipeline()
        pipe.hdel(QUARANTINE, node)
        pipe.hdel(LATE, node)
        released = bool(pipe.execute()[0])
        for scope in self.faults(node).get(node, {}):
            self.clear_fault(node, scope)
        return released

    def faults(self, node: str | None = None) -> dict[str, dict[str, dict[str, Any]]]:
        """node -> scope -> fault: what nodes (or the one named) found they cannot run."""
        match = f"{node}|*" if node is not None else "*"
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for key, raw in self.r.hscan_iter(FAULTS, match=match, count=1000):
            who, _, scope = str(key).partition("|")
            out.setdefault(who, {})[scope] = json.loads(raw)
        return out

    def clear_fault(self, node: str, scope: str) -> None:
        """The fault is gone (its path exists now, or the node was resumed or restarted)."""
        self.r.hdel(FAULTS, f"{node}|{scope}")

    def late_renewal(
        self, node: str, limit: int, window: float, reason: dict[str, Any]
    ) -> tuple[int, bool]:
        """Count a command that `node` stopped because its lease could not be renewed in time:
        (losses within `window` seconds, whether the node is quarantined now, with `reason`)."""
        n, quarantined = self._run(
            "late", [LATE, QUARANTINE], [node, limit, max(1, int(window)), json.dumps(reason)]
        )
        return int(n), bool(quarantined)

    def paused(self, node: str, reason: str | None) -> None:
        """Record that `node` takes no command for its owner policy, and why (None: it takes
        them again)."""
        if reason is None:
            self.r.hdel(PAUSED, node)
        else:
            self.r.hset(PAUSED, node, json.dumps({"reason": reason, "since": self.redis_time()}))

    def announce(self, node: str, facts: dict[str, Any]) -> None:
        """Record what a worker node runs with (FSL version, host, CPUs), for status."""
        self.r.hset(NODES, node, json.dumps(facts))

    def node_facts(self, nodes: Sequence[str]) -> dict[str, dict[str, Any]]:
        if not nodes:
            return {}
        raw = self.r.hmget(NODES, list(nodes))
        return {n: json.loads(v) for n, v in zip(nodes, raw, strict=True) if v}

    def all_node_facts(self) -> dict[str, dict[str, Any]]:
        """The facts of every node that ever announced itself (what `submit` judges by)."""
        return {str(n): json.loads(v) for n, v in self.r.hgetall(NODES).items()}

    def redis_uptime(self) -> float:
        """Seconds since redis-server started (a restart drops every expired heartbeat)."""
        return float(self.r.info("server")["uptime_in_seconds"])
