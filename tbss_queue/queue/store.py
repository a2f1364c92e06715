"""The base of every part of BatchStore: one Redis client and the Lua scripts beside this
module (lua/NAME.lua), loaded once and run by name; the Redis clock."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from importlib import resources
from typing import Any

import redis

from tbss_queue.queue.keys import (
    BATCHES,
)

ENDING_SCRIPTS = frozenset({"finish", "release", "node_fault", "cancel", "apply", "end"})
"""The scripts that can record a batch's last outcome, and so end it in the same step: each
is run with lua/ending.lua in front of it."""


@functools.cache
def _script(name: str) -> str:
    """The text of one of the Lua scripts beside this module (tbss_queue/queue/lua/NAME.lua): each
    opens with its KEYS, ARGV and the invariant it keeps."""
    folder = resources.files(__package__) / "lua"
    text = (folder / f"{name}.lua").read_text(encoding="utf-8")
    if name in ENDING_SCRIPTS:
        return (folder / "ending.lua").read_text(encoding="utf-8") + "\n" + text
    return text


def script_sha(name: str) -> str:
    """The SHA1 Redis knows a script of ours by (EVALSHA): what a trace or a proxy sees."""
    return hashlib.sha1(_script(name).encode(), usedforsecurity=False).hexdigest()


SCRIPTS = (
    "claim",
    "renew",
    "finish",
    "release",
    "cancel",
    "commit",
    "apply",
    "end",
    "drop_entries",
    "node_fault",
    "alive",
    "late",
)


@functools.lru_cache(maxsize=16)
def _registered(client: redis.Redis) -> dict[str, Any]:
    """The scripts registered with `client`, once per client (connect() keeps its clients):
    a store is made per attempt, and hashing every script again cost a tenth of a ms."""
    return {name: client.register_script(_script(name)) for name in SCRIPTS}


class Store:
    """One Redis and the scripts that change it. Cheap to create; safe after fork."""

    SCRIPTS = SCRIPTS

    def __init__(self, client: redis.Redis) -> None:
        # decode_responses=True: every reply is str; redis-py's stubs can't express that
        self.r: Any = client
        self._scripts = _registered(client)

    def load_scripts(self) -> None:
        """Have Redis hold every script now (SCRIPT LOAD): the first use of each is then one
        round trip, never a NOSCRIPT answer and a second try."""
        pipe = self.r.pipeline(transaction=False)
        for name in self.SCRIPTS:
            pipe.script_load(_script(name))
        pipe.execute()

    def _run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return self._scripts[name](keys=list(keys), args=list(args))

    def redis_time(self) -> float:
        """Redis's clock, the one every host's comparisons use."""
        seconds, micros = self.r.time()
        return float(seconds) + float(micros) / 1e6

    def batch_ids(self) -> list[str]:
        return [str(b) for b in self.r.zrange(BATCHES, 0, -1)]
