"""Batch bookkeeping in Redis: records, per-task states and the counters `status` reads.

Every state change goes through one Lua script, so a task's state and the per-batch counters
change together and exactly: a task delivered twice is counted once, and `status` reads a few
counters instead of every task (its cost does not grow with the batch).

Keys (prefix tbssq:), for batch B:
  batches             ZSET  batch id -> submit time
  b:B                 HASH  batch metadata
  b:B:cmd             HASH  task id -> JSON {line, argv, key}
  b:B:state           HASH  task id -> state
  b:B:counts          HASH  state -> number of tasks in it
  b:B:result          HASH  task id -> JSON record of its last attempt
  b:B:ended           ZSET  task id -> end time (throughput, ETA)
  b:B:nodes           HASH  "node|field" -> value (per-node counters)
  b:B:attempts        HASH  task id -> attempts started; "lost:"+id -> lost-worker requeues
  b:B:refusals        HASH  task id -> JSON {node: {cause, message}}: nodes that could not start it
  running             HASH  "B|task" -> JSON {node, token, started, pid, attempt} (global)
  lease:B|task        STRING the owning runner's token, expiring: renewed only by that runner
  alive               ZSET  node -> Redis time it last said it was up
  quarantine          HASH  node -> JSON {cause, message, path}: takes no command until cleared
  index               HASH  command key -> "B|task": latest task of a command (resume)
  nodes               HASH  node name -> JSON facts it announced at start (FSL version...)
  held                HASH  B -> JSON {after, queue, n, file_key}: staged, waiting for batches
  files               HASH  "cwd|path" -> B: the batch of a commands file (resubmission merges)
  b:B:stage:S:*       what submission S writes before its atomic commit (one set per submit)

A task id here is the command's identity within its batch (stable across attempts); every
Celery message carries a fresh id of its own (see publish.py).
"""

from __future__ import annotations

import functools
import json
import secrets
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis

from .errors import BatchNotFound

PREFIX = "tbssq:"
BATCHES = PREFIX + "batches"
RUNNING = PREFIX + "running"
INDEX = PREFIX + "index"
FILES = PREFIX + "files"
NODES = PREFIX + "nodes"
HELD = PREFIX + "held"
ALIVE = PREFIX + "alive"
QUARANTINE = PREFIX + "quarantine"

QUEUED, RUNNING_STATE, SUCCEEDED, FAILED, SKIPPED, CANCELLED = (
    "queued",
    "running",
    "succeeded",
    "failed",
    "skipped",
    "cancelled",
)
STATES = (QUEUED, RUNNING_STATE, SUCCEEDED, FAILED, SKIPPED, CANCELLED)
UNCOMMITTED_TTL = 24 * 3600
"""A batch whose submit died half-way disappears after this long; it is never visible."""


def batch_key(batch_id: str, part: str = "") -> str:
    return f"{PREFIX}b:{batch_id}" + (f":{part}" if part else "")


def member(batch_id: str, task_id: str) -> str:
    return f"{batch_id}|{task_id}"


def lease_key(batch_id: str, task_id: str) -> str:
    return f"{PREFIX}lease:{member(batch_id, task_id)}"


STAGED_PARTS = ("meta", "cmd", "state", "counts", "expect", "msgs")
"""What one submission stages (its messages last), published by commit.lua."""


def staged_keys(batch_id: str, sid: str) -> list[str]:
    return [batch_key(batch_id, f"stage:{sid}:{p}") for p in STAGED_PARTS]


def new_submission_id() -> str:
    """Each submit stages under its own id: two submits of one file never share keys."""
    return secrets.token_hex(6)


def new_batch_id() -> str:
    """A short id a person can type: 8 hex digits."""
    return secrets.token_hex(4)


@functools.cache
def _script(name: str) -> str:
    """The text of one of the Lua scripts beside this module (tbss_queue/lua/NAME.lua): each
    opens with its KEYS, ARGV and the invariant it keeps."""
    return (resources.files(__package__) / "lua" / f"{name}.lua").read_text(encoding="utf-8")


@dataclass(frozen=True)
class TaskSpec:
    """One command of a batch as stored: its task id, line, argv and identity key."""

    task_id: str
    line: int
    argv: tuple[str, ...]
    key: str
    state: str = QUEUED
    note: str = ""
    message: str = ""
    """With message signing: the submitter's signed message, which recovery sends again
    (a worker never signs a command it did not receive signed)."""
    expect: str = ""
    """The state the submitter read ('' for a new command): the commit changes the command only
    if it is still in that state."""

    def to_json(self) -> str:
        record: dict[str, Any] = {"line": self.line, "argv": list(self.argv), "key": self.key}
        if self.note:
            record["note"] = self.note
        if self.message:
            record["message"] = self.message
        return json.dumps(record)


class BatchStore:
    """Reads and writes batch records on one Redis. Cheap to create; safe after fork."""

    SCRIPTS = ("claim", "renew", "finish", "release", "cancel", "commit", "node_fault", "alive")

    def __init__(self, client: redis.Redis) -> None:
        # decode_responses=True: every reply is str; redis-py's stubs can't express that
        self.r: Any = client
        self._scripts = {name: client.register_script(_script(name)) for name in self.SCRIPTS}

    def _run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return self._scripts[name](keys=list(keys), args=list(args))

    # -- submit -------------------------------------------------------------------------------

    def stage(
        self,
        batch_id: str,
        sid: str,
        meta: dict[str, Any],
        tasks: Sequence[TaskSpec],
        messages: Sequence[tuple[str, str]],
        chunk: int = 5000,
    ) -> str | None:
        """Write submission `sid`'s records and messages where no worker or reader sees them yet.

        `tasks` are new tasks or existing ones whose state changes (requeued). Returns the Redis
        list the messages are meant for (None if there are none).
        """
        pipe: Any = self.r.pipeline(transaction=False)
        staged = staged_keys(batch_id, sid)
        s_meta, s_cmd, s_state, s_counts, s_expect, s_msgs = staged
        pipe.hset(s_meta, mapping={k: _enc(v) for k, v in meta.items()})
        # the counters of a new batch, which the commit adopts as they are
        counts = Counter(t.state for t in tasks)
        pipe.hset(s_counts, mapping={state: counts.get(state, 0) for state in STATES})
        for start in range(0, len(tasks), chunk):
            part = tasks[start : start + chunk]
            pipe.hset(s_cmd, mapping={t.task_id: t.to_json() for t in part})
            pipe.hset(s_state, mapping={t.task_id: t.state for t in part})
            expected = {t.task_id: t.expect for t in part if t.expect}
            if expected:
                pipe.hset(s_expect, mapping=expected)
            # written before the commit: an entry whose task has no state yet (not committed,
            # or never) is ignored by live_tasks, so a failed submit leaves nothing wrong here
            live = {t.key: member(batch_id, t.task_id) for t in part if t.state == QUEUED}
            if live:
                pipe.hset(INDEX, mapping=live)
            _expire(pipe, staged)
            pipe.execute()
        queue = None
        for start in range(0, len(messages), chunk):
            batch_msgs = messages[start : start + chunk]
            queue = batch_msgs[0][0]
            pipe.lpush(s_msgs, *[m for _, m in batch_msgs])
            _expire(pipe, staged)
            pipe.execute()
        _expire(pipe, staged)
        pipe.execute()
        if messages and any(q != queue for q, _ in messages):
            raise ValueError("all messages of a batch must go to one queue")
        return queue

    def commit(
        self,
        batch_id: str,
        sid: str,
        queue: str | None,
        n_messages: int,
        file_key: str,
        *,
        file_owner: str = "*",
        releasing: bool = False,
    ) -> int:
        """Publish the staged messages and merge the staged records, atomically.

        `file_owner`: the batch the submitter found for this file ('' none, '*' don't check).
        Returns the messages published; -1 (a hold someone else released) or -2 (another submit
        of this file committed first: plan again).
        """
        s_meta, s_cmd, s_state, s_counts, s_expect, s_msgs = staged_keys(batch_id, sid)
        keys = [
            batch_key(batch_id),
            batch_key(batch_id, "cmd"),
            batch_key(batch_id, "state"),
            batch_key(batch_id, "counts"),
            s_msgs,
            queue or batch_key(batch_id, "noqueue"),
            BATCHES,
            s_meta,
            s_cmd,
            s_state,
            s_counts,
            s_expect,
            FILES,
            HELD,
        ]
        args: list[Any] = [batch_id, time.time(), n_messages, file_key, int(releasing), file_owner]
        return int(self._run("commit", keys, args))

    def hold(
        self,
        batch_id: str,
        sid: str,
        queue: str | None,
        n_messages: int,
        file_key: str,
        after: Sequence[str],
    ) -> None:
        """Keep a staged submission (no expiry) until every batch in `after` is done."""
        pipe: Any = self.r.pipeline(transaction=True)
        for key in staged_keys(batch_id, sid):
            pipe.persist(key)
        hold = {"after": list(after), "queue": queue, "n": n_messages, "file_key": file_key}
        pipe.hset(HELD, batch_id, json.dumps({**hold, "sid": sid}))
        pipe.execute()

    def held(self) -> dict[str, dict[str, Any]]:
        return {b: json.loads(v) for b, v in self.r.hgetall(HELD).items()}

    def discard(self, batch_id: str, sid: str) -> None:
        """Remove whatever a failed submit staged (the batch itself is untouched)."""
        self.r.delete(*staged_keys(batch_id, sid))

    def batch_for_file(self, file_key: str) -> str | None:
        """The batch an earlier submission of this file (same path, same cwd) created."""
        found = self.r.hget(FILES, file_key)
        return str(found) if found else None

    def states_of(self, batch_id: str, task_ids: Sequence[str]) -> dict[str, str]:
        if not task_ids:
            return {}
        out = {}
        key = batch_key(batch_id, "state")
        for i in range(0, len(task_ids), 10000):
            chunk = list(task_ids[i : i + 10000])
            out.update({t: s for t, s in zip(chunk, self.r.hmget(key, chunk), strict=True) if s})
        return out

    def live_tasks(self, keys: Iterable[str]) -> dict[str, tuple[str, str, str]]:
        """For command keys, the (batch, task, state) of their latest task, where one exists."""
        keys = list(keys)
        if not keys:
            return {}
        found: dict[str, tuple[str, str]] = {}
        for i in range(0, len(keys), 10000):
            chunk = keys[i : i + 10000]
            for key, ref in zip(chunk, self.r.hmget(INDEX, chunk), strict=True):
                if ref:
                    b, t = ref.split("|", 1)
                    found[key] = (b, t)
        pipe = self.r.pipeline(transaction=False)
        items = list(found.items())
        for _, (b, t) in items:
            pipe.hget(batch_key(b, "state"), t)
        states = pipe.execute()
        return {k: (b, t, s) for (k, (b, t)), s in zip(items, states, strict=True) if s}

    # -- worker side ----------------------------------------------------------------------------

    def claim(
        self,
        batch_id: str,
        task_id: str,
        node: str,
        token: str,
        lease: float,
        pid: int,
        attempt: str = "",
    ) -> str:
        """Take a queued command under a lease of `lease` seconds held by `token`.

        Returns 'ok', 'busy' (running elsewhere), 'leased' (an earlier runner still holds it),
        'quarantined' (this node), a final state or 'unknown'."""
        keys = [
            *_task_keys(batch_id, task_id),
            batch_key(batch_id, "attempts"),
            batch_key(batch_id),
            QUARANTINE,
        ]
        args = [task_id, member(batch_id, task_id), node, token, _ms(lease), pid, attempt]
        return str(self._run("claim", keys, args))

    def renew(self, batch_id: str, task_id: str, token: str, lease: float) -> str:
        """Extend the lease if `token` still owns it: 'ok', 'cancelled' or 'lost'."""
        keys = [batch_key(batch_id, "state"), RUNNING, lease_key(batch_id, task_id)]
        args = [task_id, member(batch_id, task_id), token, _ms(lease)]
        return str(self._run("renew", keys, args))

    def finish(
        self, batch_id: str, task_id: str, node: str, token: str, state: str, record: dict[str, Any]
    ) -> str:
        """Record the outcome of one attempt: 'ok', 'not-owner' (nothing recorded) or the state
        the command had left `running` for (cancelled)."""
        keys = [
            *_task_keys(batch_id, task_id),
            batch_key(batch_id, "result"),
            batch_key(batch_id, "ended"),
            batch_key(batch_id),
        ]
        args = [
            task_id,
            member(batch_id, task_id),
            node,
            token,
            state,
            json.dumps(record),
            record.get("duration", 0.0),
        ]
        return str(self._run("finish", keys, args))

    def requeue(
        self,
        batch_id: str,
        task_id: str,
        token: str,
        *,
        limit: int,
        count_loss: bool = True,
        ignore_heartbeat: bool = False,
    ) -> str:
        """Take a task from runner `token`: 'requeued', 'lost' (crash limit), 'alive' or 'gone'."""
        keys = [
            *_task_keys(batch_id, task_id),
            batch_key(batch_id, "attempts"),
            batch_key(batch_id, "result"),
            batch_key(batch_id, "ended"),
        ]
        args = [task_id, member(batch_id, task_id), token, limit, int(count_loss)]
        return str(self._run("release", keys, [*args, int(ignore_heartbeat)]))

    def hand_back(self, batch_id: str, task_id: str, token: str) -> str:
        """The owner gives its command up, unfailed (not a loss): 'requeued' (queue it again),
        or 'gone' (cancelled meanwhile, or not ours any more)."""
        return self.requeue(
            batch_id, task_id, token, limit=1, count_loss=False, ignore_heartbeat=True
        )

    def node_fault(
        self,
        batch_id: str,
        task_id: str,
        node: str,
        token: str,
        reason: dict[str, Any],
        live_window: float,
    ) -> str:
        """Hand a command back for a reason of this node: 'requeued' (node quarantined),
        'failed' (every node taking commands refused it) or 'not-owner'."""
        keys = [
            *_task_keys(batch_id, task_id),
            batch_key(batch_id, "result"),
            batch_key(batch_id, "ended"),
            batch_key(batch_id, "refusals"),
            ALIVE,
            QUARANTINE,
        ]
        args = [task_id, member(batch_id, task_id), node, token, json.dumps(reason), live_window]
        return str(self._run("node_fault", keys, args))

    def cancel(self, batch_id: str) -> int:
        """Mark queued and running tasks cancelled; their runners stop at the next renewal."""
        keys = [batch_key(batch_id, "state"), batch_key(batch_id, "counts"), batch_key(batch_id)]
        return int(self._run("cancel", keys, []))

    # -- nodes ----------------------------------------------------------------------------------

    def alive(self, node: str) -> None:
        """Say this node is up (Redis's clock: hosts' clocks may disagree)."""
        self._run("alive", [ALIVE], [node])

    def gone(self, node: str) -> None:
        """This node is stopping: it no longer counts as taking commands."""
        self.r.zrem(ALIVE, node)

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
        """Let a quarantined node take commands again; False if it was not quarantined."""
        return bool(self.r.hdel(QUARANTINE, node))

    def redis_time(self) -> float:
        """Redis's clock, the one every host's comparisons use."""
        seconds, micros = self.r.time()
        return float(seconds) + float(micros) / 1e6

    def save_result(self, batch_id: str, task_id: str, record: dict[str, Any]) -> None:
        """Keep the record of an attempt that will be retried (its state stays queued)."""
        self.r.hset(batch_key(batch_id, "result"), task_id, json.dumps(record))

    def announce(self, node: str, facts: dict[str, Any]) -> None:
        """Record what a worker node runs with (FSL version, host, CPUs), for status."""
        self.r.hset(NODES, node, json.dumps(facts))

    def node_facts(self, nodes: Sequence[str]) -> dict[str, dict[str, Any]]:
        if not nodes:
            return {}
        raw = self.r.hmget(NODES, list(nodes))
        return {n: json.loads(v) for n, v in zip(nodes, raw, strict=True) if v}

    def redis_uptime(self) -> float:
        """Seconds since redis-server started (a restart drops every expired heartbeat)."""
        return float(self.r.info("server")["uptime_in_seconds"])

    def lease_alive(self, batch_id: str, task_id: str) -> bool:
        return bool(self.r.exists(lease_key(batch_id, task_id)))

    def meta(self, batch_id: str) -> dict[str, Any]:
        return {k: _dec(v) for k, v in self.r.hgetall(batch_key(batch_id)).items()}

    # -- readers --------------------------------------------------------------------------------

    def latest_batch_id(self) -> str:
        ids = self.r.zrange(BATCHES, -1, -1)
        if not ids:
            raise BatchNotFound("no batch has been submitted to this broker yet")
        return str(ids[0])

    def batch_ids(self) -> list[str]:
        return [str(b) for b in self.r.zrange(BATCHES, 0, -1)]

    def resolve_id(self, batch_id: str | None) -> str:
        """The full id of a batch given by id or unique prefix; None means the latest batch."""
        if batch_id is None:
            return self.latest_batch_id()
        if self.r.zscore(BATCHES, batch_id) is not None:
            return batch_id
        matches = [b for b in self.batch_ids() if b.startswith(batch_id)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            waiting = self.r.hget(HELD, batch_id)
            if waiting:
                after = ", ".join(json.loads(waiting)["after"])
                raise BatchNotFound(f"batch {batch_id} is held until batch(es) {after} end")
            raise BatchNotFound(f"batch {batch_id!r} not found (see `tbss-queue batches`)")
        raise BatchNotFound(f"batch prefix {batch_id!r} is ambiguous: {', '.join(matches)}")

    def snapshot(self, batch_id: str, window: float = 600.0) -> dict[str, Any]:
        """Everything `status` needs, in two round trips of a fixed number of commands; times
        are Redis's, like those the workers record."""
        now = self.redis_time()
        pipe = self.r.pipeline(transaction=False)
        pipe.hgetall(batch_key(batch_id))
        pipe.hgetall(batch_key(batch_id, "counts"))
        pipe.hgetall(batch_key(batch_id, "nodes"))
        pipe.zcount(batch_key(batch_id, "ended"), now - window, "+inf")
        meta, counts, nodes, recent = pipe.execute()
        if not meta or "committed" not in meta:
            raise BatchNotFound(f"batch {batch_id!r} not found (see `tbss-queue batches`)")
        return {
            "meta": {k: _dec(v) for k, v in meta.items()},
            "counts": {k: int(v) for k, v in counts.items()},
            "nodes": nodes,
            "recent": int(recent),
            "now": now,
            "window": window,
        }

    def task_specs(
        self, batch_id: str, task_ids: Sequence[str] | None = None
    ) -> dict[str, dict[str, Any]]:
        """task id -> {line, argv, key, note}: every task of the batch, or the ones named."""
        return self._json_fields(batch_key(batch_id, "cmd"), task_ids)

    def states(self, batch_id: str) -> dict[str, str]:
        return dict(self.r.hgetall(batch_key(batch_id, "state")))

    def results(
        self, batch_id: str, task_ids: Sequence[str] | None = None
    ) -> dict[str, dict[str, Any]]:
        """task id -> record of its last attempt: every task that has one, or the ones named."""
        return self._json_fields(batch_key(batch_id, "result"), task_ids)

    def _json_fields(self, key: str, fields: Sequence[str] | None) -> dict[str, dict[str, Any]]:
        """The JSON values of a hash: all of them, or those of `fields` that exist."""
        if fields is None:
            raw = self.r.hgetall(key)
        elif not fields:
            return {}
        else:
            raw = dict(zip(fields, self.r.hmget(key, list(fields)), strict=True))
        return {f: json.loads(v) for f, v in raw.items() if v}

    def running(self, batch_id: str | None = None) -> dict[str, dict[str, Any]]:
        """Running records ("batch|task" -> record), optionally of one batch."""
        out = {}
        for m, v in self.r.hgetall(RUNNING).items():
            if batch_id is None or m.startswith(batch_id + "|"):
                out[m] = json.loads(v)
        return out


def _task_keys(batch_id: str, task_id: str) -> list[str]:
    """KEYS[1..5] of the per-task scripts: state counts nodes running lease."""
    return [
        batch_key(batch_id, "state"),
        batch_key(batch_id, "counts"),
        batch_key(batch_id, "nodes"),
        RUNNING,
        lease_key(batch_id, task_id),
    ]


def _expire(pipe: Any, keys: Iterable[str]) -> None:
    for key in keys:
        pipe.expire(key, UNCOMMITTED_TTL)


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _enc(value: Any) -> str:
    return json.dumps(value)


def _dec(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value
