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
  running             HASH  "B|task" -> JSON {node, token, started, pid} (global)
  hb:B|task           STRING runner token, expiring: the running command's heartbeat
  index               HASH  command key -> "B|task": latest task of a command (resume)
  nodes               HASH  node name -> JSON facts it announced at start (FSL version...)
  held                HASH  B -> JSON {after, queue, n, file_key}: staged, waiting for batches
  files               HASH  "cwd|path" -> B: the batch of a commands file (resubmission merges)
  b:B:stage:*, b:B:staging   what a submit writes before its atomic commit
"""

from __future__ import annotations

import json
import secrets
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
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


def heartbeat_key(batch_id: str, task_id: str) -> str:
    return f"{PREFIX}hb:{member(batch_id, task_id)}"


STAGED_PARTS = ("meta", "cmd", "state", "counts")
"""What a submit stages per batch (besides its messages), committed by _COMMIT."""


def staged_keys(batch_id: str) -> list[str]:
    return [batch_key(batch_id, f"stage:{p}") for p in STAGED_PARTS]


def new_batch_id() -> str:
    """A short id a person can type: 8 hex digits."""
    return secrets.token_hex(4)


# Moves a queued task into `running` for one runner. A running task is never taken over here,
# even with a lapsed heartbeat: only the reaper (recovery.py) decides that a runner is gone.
# KEYS: state counts nodes running hb attempts meta; ARGV: tid member node now token
# ttl pid
_CLAIM = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if not old then return 'unknown' end
if old == 'succeeded' or old == 'failed' or old == 'cancelled' or old == 'skipped' then
  return old
end
if old == 'running' then return 'busy' end
redis.call('HSET', KEYS[1], ARGV[1], 'running')
redis.call('HINCRBY', KEYS[2], old, -1)
redis.call('HINCRBY', KEYS[2], 'running', 1)
redis.call('HINCRBY', KEYS[3], ARGV[3] .. '|running', 1)
redis.call('HSET', KEYS[3], ARGV[3] .. '|seen', ARGV[4])
redis.call('HSET', KEYS[4], ARGV[2], cjson.encode({node=ARGV[3], token=ARGV[5],
  started=tonumber(ARGV[4]), pid=tonumber(ARGV[7])}))
redis.call('SET', KEYS[5], ARGV[5], 'EX', ARGV[6])
redis.call('HINCRBY', KEYS[6], ARGV[1], 1)
redis.call('HSETNX', KEYS[7], 'first_started', ARGV[4])
return 'ok'
"""

# Records the end of one attempt. The first final outcome wins, except that a success replaces a
# failure (a rerun that worked). KEYS: state counts nodes running hb result ended meta;
# ARGV: tid member node now token new_state record_json duration
_FINISH = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if not old then return 'unknown' end
local rec = redis.call('HGET', KEYS[4], ARGV[2])
if rec and cjson.decode(rec)['token'] == ARGV[5] then
  redis.call('HDEL', KEYS[4], ARGV[2])
  redis.call('DEL', KEYS[5])
  redis.call('HINCRBY', KEYS[3], ARGV[3] .. '|running', -1)
end
redis.call('HSET', KEYS[3], ARGV[3] .. '|seen', ARGV[4])
if old == 'succeeded' or old == 'cancelled' or old == 'skipped' or old == ARGV[6] then
  return old
end
if rec and old == 'running' and cjson.decode(rec)['token'] ~= ARGV[5] then
  -- another runner owns it now; let that one report
  return 'taken'
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[6])
redis.call('HINCRBY', KEYS[2], old, -1)
redis.call('HINCRBY', KEYS[2], ARGV[6], 1)
redis.call('HSET', KEYS[6], ARGV[1], ARGV[7])
redis.call('ZADD', KEYS[7], ARGV[4], ARGV[1])
redis.call('HINCRBY', KEYS[3], ARGV[3] .. '|' .. ARGV[6], 1)
redis.call('HINCRBYFLOAT', KEYS[3], ARGV[3] .. '|busy', ARGV[8])
redis.call('HSET', KEYS[8], 'last_ended', ARGV[4])
return 'ok'
"""

# Makes a submission visible and its messages consumable, all at once. A new batch's staged
# records become its records by RENAME (constant time: a 1,000,000-command commit would block
# Redis for 16 s merging them entry by entry); a resubmission's staged task states (new tasks, or
# failed ones queued again) are merged in, counters following. Messages move to the queue.
# KEYS: meta cmd state counts staging queue batches s_meta s_cmd s_state s_counts files held;
# ARGV: batch_id now n_messages file_key releasing_a_hold
_COMMIT = """
-- a held submission (ARGV[5] == '1') is committed once, by whoever removes it from `held`
if ARGV[5] == '1' and redis.call('HDEL', KEYS[13], ARGV[1]) == 0 then return -1 end
local function merge(src, dst)
  local kv = redis.call('HGETALL', src)
  for i = 1, #kv, 2 do redis.call('HSET', dst, kv[i], kv[i + 1]) end
end
local function adopt(src, dst)
  if redis.call('EXISTS', src) == 1 then
    redis.call('RENAME', src, dst)
    redis.call('PERSIST', dst)
  end
end
merge(KEYS[8], KEYS[1])
if redis.call('EXISTS', KEYS[3]) == 0 then
  adopt(KEYS[9], KEYS[2])
  adopt(KEYS[10], KEYS[3])
  adopt(KEYS[11], KEYS[4])
else
  merge(KEYS[9], KEYS[2])
  local st = redis.call('HGETALL', KEYS[10])
  for i = 1, #st, 2 do
    local old = redis.call('HGET', KEYS[3], st[i])
    if old then redis.call('HINCRBY', KEYS[4], old, -1) end
    redis.call('HSET', KEYS[3], st[i], st[i + 1])
    redis.call('HINCRBY', KEYS[4], st[i + 1], 1)
  end
end
local n = tonumber(ARGV[3])
for i = 1, n do redis.call('LMOVE', KEYS[5], KEYS[6], 'RIGHT', 'LEFT') end
redis.call('DEL', KEYS[5], KEYS[8], KEYS[9], KEYS[10], KEYS[11])
redis.call('HSET', KEYS[1], 'total', redis.call('HLEN', KEYS[3]), 'committed', ARGV[2])
redis.call('HSET', KEYS[12], ARGV[4], ARGV[1])
redis.call('ZADD', KEYS[7], 'NX', ARGV[2], ARGV[1])
return n
"""


# Takes a task away from a runner that is gone (no heartbeat) or stopped: back to queued, or
# failed as `lost` once it has lost its worker `limit` times. Only the runner's own record (token)
# is released, so two reapers can't both requeue. KEYS: state counts nodes running hb attempts
# result ended; ARGV: tid member token now limit count_loss ignore_heartbeat
_REQUEUE = """
local rec = redis.call('HGET', KEYS[4], ARGV[2])
if not rec then return 'gone' end
local r = cjson.decode(rec)
if r['token'] ~= ARGV[3] then return 'gone' end
if ARGV[7] == '0' and redis.call('EXISTS', KEYS[5]) == 1 then return 'alive' end
redis.call('HDEL', KEYS[4], ARGV[2])
redis.call('DEL', KEYS[5])
redis.call('HINCRBY', KEYS[3], r['node'] .. '|running', -1)
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old ~= 'running' then return 'gone' end
local lost = 0
if ARGV[6] == '1' then lost = redis.call('HINCRBY', KEYS[6], 'lost:' .. ARGV[1], 1) end
local new = 'queued'
if lost >= tonumber(ARGV[5]) then new = 'failed' end
redis.call('HSET', KEYS[1], ARGV[1], new)
redis.call('HINCRBY', KEYS[2], 'running', -1)
redis.call('HINCRBY', KEYS[2], new, 1)
if new == 'failed' then
  local msg = 'worker lost ' .. lost .. ' times while running it (last: ' .. r['node'] ..
    '); crash limit reached'
  redis.call('HSET', KEYS[7], ARGV[1], cjson.encode({cause='lost', message=msg,
    node=r['node'], exit_code=cjson.null, started=r['started'], ended=tonumber(ARGV[4]),
    duration=tonumber(ARGV[4]) - r['started'], stdout_tail='', stderr_tail=msg}))
  redis.call('ZADD', KEYS[8], ARGV[4], ARGV[1])
  redis.call('HINCRBY', KEYS[3], r['node'] .. '|failed', 1)
  return 'lost'
end
return 'requeued'
"""


# Cancels every queued or running task of a batch; returns the ids that were running (their
# processes are then killed through Celery's revoke). KEYS: state counts nodes running ended
# meta; ARGV: batch_id now hb_prefix
_CANCEL = """
local st = redis.call('HGETALL', KEYS[1])
local was_running = {}
for i = 1, #st, 2 do
  local tid, old = st[i], st[i + 1]
  if old == 'queued' or old == 'running' then
    redis.call('HSET', KEYS[1], tid, 'cancelled')
    redis.call('HINCRBY', KEYS[2], old, -1)
    redis.call('HINCRBY', KEYS[2], 'cancelled', 1)
    if old == 'running' then
      table.insert(was_running, tid)
      local m = ARGV[1] .. '|' .. tid
      local rec = redis.call('HGET', KEYS[4], m)
      if rec then
        redis.call('HINCRBY', KEYS[3], cjson.decode(rec)['node'] .. '|running', -1)
        redis.call('HDEL', KEYS[4], m)
      end
      redis.call('DEL', ARGV[3] .. m)
    end
  end
end
redis.call('HSET', KEYS[6], 'cancelled_at', ARGV[2])
return was_running
"""


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

    def to_json(self) -> str:
        record: dict[str, Any] = {"line": self.line, "argv": list(self.argv), "key": self.key}
        if self.note:
            record["note"] = self.note
        if self.message:
            record["message"] = self.message
        return json.dumps(record)


class BatchStore:
    """Reads and writes batch records on one Redis. Cheap to create; safe after fork."""

    def __init__(self, client: redis.Redis) -> None:
        # decode_responses=True: every reply is str; redis-py's stubs can't express that
        self.r: Any = client
        self._claim = client.register_script(_CLAIM)
        self._finish = client.register_script(_FINISH)
        self._commit = client.register_script(_COMMIT)
        self._requeue = client.register_script(_REQUEUE)
        self._cancel = client.register_script(_CANCEL)

    # -- submit -------------------------------------------------------------------------------

    def stage(
        self,
        batch_id: str,
        meta: dict[str, Any],
        tasks: Sequence[TaskSpec],
        messages: Sequence[tuple[str, str]],
        chunk: int = 5000,
    ) -> str | None:
        """Write a submission's records and messages where no worker or reader sees them yet.

        `tasks` are new tasks or existing ones whose state changes (requeued). Returns the Redis
        list the messages are meant for (None if there are none).
        """
        pipe: Any = self.r.pipeline(transaction=False)
        staged = staged_keys(batch_id)
        staging = batch_key(batch_id, "staging")
        pipe.hset(staged[0], mapping={k: _enc(v) for k, v in meta.items()})
        # the counters of a new batch, which the commit adopts as they are
        counts = Counter(t.state for t in tasks)
        pipe.hset(staged[3], mapping={state: counts.get(state, 0) for state in STATES})
        for start in range(0, len(tasks), chunk):
            part = tasks[start : start + chunk]
            pipe.hset(staged[1], mapping={t.task_id: t.to_json() for t in part})
            pipe.hset(staged[2], mapping={t.task_id: t.state for t in part})
            # written before the commit: an entry whose task has no state yet (not committed,
            # or never) is ignored by live_tasks, so a failed submit leaves nothing wrong here
            live = {t.key: member(batch_id, t.task_id) for t in part if t.state == QUEUED}
            if live:
                pipe.hset(INDEX, mapping=live)
            _expire(pipe, (*staged, staging))
            pipe.execute()
        queue = None
        for start in range(0, len(messages), chunk):
            batch_msgs = messages[start : start + chunk]
            queue = batch_msgs[0][0]
            pipe.lpush(staging, *[m for _, m in batch_msgs])
            _expire(pipe, (*staged, staging))
            pipe.execute()
        _expire(pipe, (*staged, staging))
        pipe.execute()
        if messages and any(q != queue for q, _ in messages):
            raise ValueError("all messages of a batch must go to one queue")
        return queue

    def commit(
        self,
        batch_id: str,
        queue: str | None,
        n_messages: int,
        file_key: str,
        releasing: bool = False,
    ) -> bool:
        """Publish the staged messages and merge the staged records, atomically."""
        keys = [
            batch_key(batch_id),
            batch_key(batch_id, "cmd"),
            batch_key(batch_id, "state"),
            batch_key(batch_id, "counts"),
            batch_key(batch_id, "staging"),
            queue or batch_key(batch_id, "noqueue"),
            BATCHES,
            *staged_keys(batch_id),
            FILES,
            HELD,
        ]
        args: list[Any] = [batch_id, time.time(), n_messages, file_key, int(releasing)]
        return int(self._commit(keys=keys, args=args)) >= 0

    def hold(
        self, batch_id: str, queue: str | None, n_messages: int, file_key: str, after: Sequence[str]
    ) -> None:
        """Keep a staged submission (no expiry) until every batch in `after` is done."""
        pipe: Any = self.r.pipeline(transaction=True)
        for key in (*staged_keys(batch_id), batch_key(batch_id, "staging")):
            pipe.persist(key)
        pipe.hset(
            HELD,
            batch_id,
            json.dumps(
                {"after": list(after), "queue": queue, "n": n_messages, "file_key": file_key}
            ),
        )
        pipe.execute()

    def held(self) -> dict[str, dict[str, Any]]:
        return {b: json.loads(v) for b, v in self.r.hgetall(HELD).items()}

    def discard(self, batch_id: str) -> None:
        """Remove whatever a failed submit staged (the batch itself is untouched)."""
        self.r.delete(batch_key(batch_id, "staging"), *staged_keys(batch_id))

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
        self, batch_id: str, task_id: str, node: str, token: str, ttl: float, pid: int
    ) -> str:
        """Mark a task running for this runner. Returns 'ok', 'busy', a final state or 'unknown'."""
        keys = [
            *_task_keys(batch_id, task_id),
            batch_key(batch_id, "attempts"),
            batch_key(batch_id),
        ]
        args: list[Any] = [
            task_id,
            member(batch_id, task_id),
            node,
            time.time(),
            token,
            max(1, int(ttl)),
            pid,
        ]
        return str(self._claim(keys=keys, args=args))

    def heartbeat(self, batch_id: str, task_id: str, token: str, ttl: float) -> None:
        """Keep a running command's heartbeat alive."""
        self.r.set(heartbeat_key(batch_id, task_id), token, ex=max(1, int(ttl)))

    def finish(
        self, batch_id: str, task_id: str, node: str, token: str, state: str, record: dict[str, Any]
    ) -> str:
        """Record the outcome of one attempt; returns 'ok' or why it changed nothing."""
        keys = [
            *_task_keys(batch_id, task_id),
            batch_key(batch_id, "result"),
            batch_key(batch_id, "ended"),
            batch_key(batch_id),
        ]
        now = record.get("ended") or time.time()
        args = [
            task_id,
            member(batch_id, task_id),
            node,
            now,
            token,
            state,
            json.dumps(record),
            record.get("duration", 0.0),
        ]
        return str(self._finish(keys=keys, args=args))

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
        args: list[Any] = [
            task_id,
            member(batch_id, task_id),
            token,
            time.time(),
            limit,
            int(count_loss),
            int(ignore_heartbeat),
        ]
        return str(self._requeue(keys=keys, args=args))

    def cancel(self, batch_id: str) -> list[str]:
        """Mark queued and running tasks cancelled; returns the ids that were running."""
        keys = [
            batch_key(batch_id, "state"),
            batch_key(batch_id, "counts"),
            batch_key(batch_id, "nodes"),
            RUNNING,
            batch_key(batch_id, "ended"),
            batch_key(batch_id),
        ]
        return [
            str(t) for t in self._cancel(keys=keys, args=[batch_id, time.time(), PREFIX + "hb:"])
        ]

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

    def heartbeat_alive(self, batch_id: str, task_id: str) -> bool:
        return bool(self.r.exists(heartbeat_key(batch_id, task_id)))

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
        """Everything `status` needs, in one round trip of a fixed number of commands."""
        now = time.time()
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
    """KEYS[1..5] of the per-task scripts: state counts nodes running heartbeat."""
    return [
        batch_key(batch_id, "state"),
        batch_key(batch_id, "counts"),
        batch_key(batch_id, "nodes"),
        RUNNING,
        heartbeat_key(batch_id, task_id),
    ]


def _expire(pipe: Any, keys: Iterable[str]) -> None:
    for key in keys:
        pipe.expire(key, UNCOMMITTED_TTL)


def _enc(value: Any) -> str:
    return json.dumps(value)


def _dec(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value
