"""Batch bookkeeping in Redis: records, per-task states and the counters `status` reads.

Every state change goes through one Lua script, so a task's state and the per-batch counters
change together and exactly: a task delivered twice is counted once, and `status` reads a few
counters instead of every task (its cost does not grow with the batch).

Keys (prefix tbssq:), for batch B:
  batches             ZSET  batch id -> submit time
  b:B                 HASH  batch metadata
  b:B:cmd             HASH  task id -> JSON {line, argv}
  b:B:state           HASH  task id -> state
  b:B:counts          HASH  state -> number of tasks in it
  b:B:result          HASH  task id -> JSON record of its last attempt
  b:B:ended           ZSET  task id -> end time (throughput, ETA)
  b:B:nodes           HASH  "node|field" -> value (per-node counters)
  b:B:attempts        HASH  task id -> attempts started; "lost:"+id -> lost-worker requeues;
                            "requeued", "lost": the batch's totals of both (status)
  b:B:refusals        HASH  task id -> JSON {node: {cause, message}}: nodes that could not start it
  b:B:runs            LIST  a line per recorded attempt (RUN_FIELDS): what the report reads
  b:B:failed          SET   task ids failed now: what `failures` reads
  running             HASH  "B|task" -> JSON {node, token, started, pid, attempt} (global)
  lease:B|task        STRING the owning runner's token, expiring: renewed only by that runner
  alive               ZSET  node -> Redis time it last said it was up
  stopping            HASH  node -> Redis time it began to stop (SIGTERM, --stop-after)
  quarantine          HASH  node -> JSON {cause, message, path}: takes no command until cleared
  late                HASH  node -> JSON {n, since}: its runners' recent lease losses (lua/late.lua)
  owed                ZSET  "B|task" -> time from which a requeued command is owed a message
  faults              HASH  "node|scope" -> JSON {cause, message, path}: what a node can't run
  index:KK            HASH  command key -> B: latest batch of a command (its task id there is
                            task_id_for(B, key)), in 256 buckets by the key's first 2 hex
                            digits (index_key)
  nodes               HASH  node name -> JSON facts it announced at start (FSL version...)
  held                HASH  B -> JSON {after, file_key, staging}: staged, waiting for batches
  files               HASH  "cwd|path" -> B: the batch of a commands file (resubmission merges)
  active              SET   batches not ended (something queued, running or being applied)
  pending             HASH  B -> JSON Staging + step: a committed submission being applied
  b:B:stage:S:*       what submission S stages before its commit (one set per submit)

An ended batch's keys expire after TBSS_QUEUE_KEEP (lua/end.lua); the workers then drop what
points to it (BatchStore.drop_references).

A task id here is the command's identity within its batch (stable across attempts); every
Celery message carries a fresh id of its own (see publish.py).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis

from tbss_queue.config import DEFAULT_KEEP
from tbss_queue.errors import BatchNotFound
from tbss_queue.models import Fleet

PREFIX = "tbssq:"
BATCHES = PREFIX + "batches"
RUNNING = PREFIX + "running"
LEGACY_INDEX = PREFIX + "index"
"""The command index as one hash, before it was split into buckets: read and swept while an
upgraded Redis still holds it."""
INDEX_DIGITS = 2
FILES = PREFIX + "files"
NODES = PREFIX + "nodes"
HELD = PREFIX + "held"
ALIVE = PREFIX + "alive"
STOPPING = PREFIX + "stopping"
QUARANTINE = PREFIX + "quarantine"
LATE = PREFIX + "late"
FAULTS = PREFIX + "faults"
"""HASH "node|scope" -> JSON {cause, message, path}: what a node cannot run (lua/node_fault.lua)."""
OWED = PREFIX + "owed"
"""ZSET "B|task" -> Redis time from which a requeued command is owed a message (release.lua)."""
CANCEL_CHANNEL = PREFIX + "cancelled"
"""Pub/sub: a batch id, published when the batch is cancelled (nudges.py)."""
ACTIVE = PREFIX + "active"
PENDING = PREFIX + "pending"

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


def index_key(command_key: str) -> str:
    """The bucket of the command index that holds a command. Many small hashes rather than one
    of a million entries: dropping an ended batch's entries from that one hash took steps of up
    to 276 ms; a bucket holds a 256th of it, and its sweep stays under 10 ms at a million."""
    return f"{PREFIX}index:{command_key[:INDEX_DIGITS]}"


def index_buckets() -> list[str]:
    """Every bucket of the command index (most exist once a study has a few thousand commands)."""
    return [f"{PREFIX}index:{i:0{INDEX_DIGITS}x}" for i in range(16**INDEX_DIGITS)]


def member(batch_id: str, task_id: str) -> str:
    return f"{batch_id}|{task_id}"


def lease_key(batch_id: str, task_id: str) -> str:
    return f"{PREFIX}lease:{member(batch_id, task_id)}"


BATCH_PARTS = (
    "",
    "cmd",
    "state",
    "counts",
    "result",
    "ended",
    "nodes",
    "attempts",
    "refusals",
    "runs",
    "failed",
)
"""Every key of a committed batch (b:B, b:B:cmd, ...): what retention expires, commit keeps."""

CHUNK = 2000
"""Commands per bounded step (a staged chunk merged, messages moved, entries cancelled): a few
milliseconds of Redis each, so that no script stalls the workers at any batch size."""


def staged_key(batch_id: str, sid: str, part: str) -> str:
    return batch_key(batch_id, f"stage:{sid}:{part}")


@dataclass(frozen=True)
class Staging:
    """A submission staged where no worker or reader sees it yet, and how to commit it:
    `new` batches adopt whole staged hashes; a `merge` is staged in `chunks` to apply one by
    one; `n` messages wait in one staged list for `queue`."""

    batch_id: str
    sid: str
    mode: str
    chunks: int
    queue: str | None
    n: int

    def chunk_keys(self, i: int) -> list[str]:
        return [staged_key(self.batch_id, self.sid, f"{p}:{i}") for p in ("cmd", "state", "expect")]

    def keys_key(self, i: int) -> str:
        """Chunk i's queued commands: task id -> command key, for the command index, which
        `apply` writes in the step that decides whether another batch has them already."""
        return staged_key(self.batch_id, self.sid, f"keys:{i}")

    @property
    def whole_keys(self) -> list[str]:
        return [staged_key(self.batch_id, self.sid, p) for p in ("meta", "cmd", "state", "counts")]

    @property
    def messages_key(self) -> str:
        return staged_key(self.batch_id, self.sid, "msgs")

    def all_keys(self) -> list[str]:
        chunked = [k for i in range(self.chunks) for k in (*self.chunk_keys(i), self.keys_key(i))]
        return [*self.whole_keys, self.messages_key, *chunked]

    def to_json(self, **extra: Any) -> str:
        """What a hold or a pending record keeps of it (`extra`: the step reached)."""
        fields = {"sid": self.sid, "mode": self.mode, "chunks": self.chunks, "queue": self.queue}
        return json.dumps({**fields, "n": self.n, **extra})

    @classmethod
    def from_json(cls, batch_id: str, raw: str) -> Staging:
        d = json.loads(raw)
        return cls(batch_id, d["sid"], d.get("mode", "merge"), d["chunks"], d["queue"], d["n"])


def new_submission_id() -> str:
    """Each submit stages under its own id: two submits of one file never share keys."""
    return secrets.token_hex(6)


_NAMESPACE = uuid.UUID("6b7c1f1e-2f55-4d0c-9a43-3c1f3e0a7b42")


def task_id_for(batch_id: str, command_key: str) -> str:
    """A command's id derives from batch and command: it can't be queued twice in a batch.

    It names the command in the batch records. Each Celery message carries a fresh id of its
    own (one row per attempt in Flower, and no id a worker remembers as revoked is ever reused);
    the command's id travels in the message's arguments and in its `tbssq` header. 16 hex
    digits (64 bits: no collision in a batch of millions) rather than a UUID's 36 characters:
    the id is stored five times per command."""
    return uuid.uuid5(_NAMESPACE, f"{batch_id}|{command_key}").hex[:16]


def new_batch_id() -> str:
    """A short id a person can type: 8 hex digits."""
    return secrets.token_hex(4)


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


def ending_keys(batch_id: str) -> list[str]:
    """What lua/ending.lua's end_if_idle reads and expires: active pending meta counts, then
    every other key of the batch."""
    return [
        ACTIVE,
        PENDING,
        batch_key(batch_id),
        batch_key(batch_id, "counts"),
        *(batch_key(batch_id, p) for p in BATCH_PARTS if p not in ("", "counts")),
    ]


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
        record: dict[str, Any] = {"line": self.line, "argv": list(self.argv)}
        if self.note:
            record["note"] = self.note
        if self.message:
            record["message"] = self.message
        return json.dumps(record)


class BatchStore:
    """Reads and writes batch records on one Redis. Cheap to create; safe after fork."""

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

    def __init__(self, client: redis.Redis) -> None:
        # decode_responses=True: every reply is str; redis-py's stubs can't express that
        self.r: Any = client
        self._scripts = {name: client.register_script(_script(name)) for name in self.SCRIPTS}

    def load_scripts(self) -> None:
        """Have Redis hold every script now (SCRIPT LOAD): the first use of each is then one
        round trip, never a NOSCRIPT answer and a second try."""
        pipe = self.r.pipeline(transaction=False)
        for name in self.SCRIPTS:
            pipe.script_load(_script(name))
        pipe.execute()

    def _run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return self._scripts[name](keys=list(keys), args=list(args))

    # -- submit -------------------------------------------------------------------------------

    def stage_meta(self, batch_id: str, sid: str, meta: dict[str, Any]) -> None:
        """Begin staging submission `sid`: its metadata, and a new batch's counters at 0."""
        s_meta, _, _, s_counts = Staging(batch_id, sid, "new", 0, None, 0).whole_keys
        pipe: Any = self.r.pipeline(transaction=False)
        pipe.hset(s_meta, mapping={k: _enc(v) for k, v in meta.items()})
        pipe.hset(s_counts, mapping=dict.fromkeys(STATES, 0))
        _expire(pipe, [s_meta, s_counts])
        pipe.execute()

    def stage_part(
        self, staging: Staging, tasks: Sequence[TaskSpec], messages: Sequence[tuple[str, str]]
    ) -> None:
        """Stage one part of a submission (part number `staging.chunks`, from 1) where no worker
        or reader sees it yet: records of new tasks or of existing ones whose state changes,
        and their messages. A new batch is staged whole, to be adopted by RENAME; a merge in
        chunks that `apply` merges one per step."""
        s_meta, s_cmd, s_state, s_counts = staging.whole_keys
        if staging.mode == "merge":
            c_cmd, c_state, c_expect = staging.chunk_keys(staging.chunks - 1)
        else:
            c_cmd, c_state, c_expect = s_cmd, s_state, ""
        c_keys = staging.keys_key(staging.chunks - 1)
        touched = [s_meta, s_counts, c_cmd, c_state, c_keys, staging.messages_key]
        touched += [c_expect] if c_expect else []
        pipe: Any = self.r.pipeline(transaction=False)
        if tasks:
            pipe.hset(c_cmd, mapping={t.task_id: t.to_json() for t in tasks})
            pipe.hset(c_state, mapping={t.task_id: t.state for t in tasks})
        if c_expect and (expected := {t.task_id: t.expect for t in tasks if t.expect}):
            pipe.hset(c_expect, mapping=expected)
        if not c_expect:  # the counters of a new batch, which the commit adopts as they are
            for state, n in Counter(t.state for t in tasks).items():
                pipe.hincrby(s_counts, state, n)
        # the command index is written by `apply`, never before the commit: a submit that
        # loses the commit (or fails) has nothing of another's to undo there
        if keyed := {t.task_id: t.key for t in tasks if t.state == QUEUED and t.key}:
            pipe.hset(c_keys, mapping=keyed)
        if any(q != staging.queue for q, _ in messages):
            raise ValueError("all messages of a batch must go to one queue")
        if messages:
            pipe.lpush(staging.messages_key, *[m for _, m in messages])
        _expire(pipe, touched)
        pipe.execute()

    def commit(
        self,
        staging: Staging,
        file_key: str,
        *,
        file_owner: str = "*",
        releasing: bool = False,
        pending: dict[str, Any] | None = None,
    ) -> int:
        """The constant-time switch that makes a staged submission certain to be applied whole
        (then `apply` carries it out in bounded steps).

        `file_owner`: the batch the submitter found for this file ('' none, '*' don't check).
        Returns 1; -1 (a hold someone else released), -2 (another submit of this file
        committed first: plan again) or -3 (an earlier submission is still being applied)."""
        b = staging.batch_id
        keys = [
            batch_key(b),
            batch_key(b, "cmd"),
            batch_key(b, "state"),
            batch_key(b, "counts"),
            BATCHES,
            *staging.whole_keys,
            FILES,
            HELD,
            ACTIVE,
            PENDING,
            *(batch_key(b, p) for p in BATCH_PARTS[4:]),
            staging.messages_key,
            *(
                k
                for i in range(staging.chunks)
                for k in (*staging.chunk_keys(i), staging.keys_key(i))
            ),
        ]
        args = [
            b,
            time.time(),
            file_key,
            int(releasing),
            file_owner,
            staging.mode,
            staging.to_json(next=0, **(pending or {})),
        ]
        return int(self._run("commit", keys, args))

    def apply(self, batch_id: str, *, messages: bool = True) -> int:
        """Carry a committed submission out, one bounded step per script, until done. Any
        process may call it (a reaper finishes what a submitter that died began). Returns how
        many of the commands it queued were found queued, running or done in another batch by
        then (they are skipped), in the steps this call carried out. `messages=False`: stop
        once every change is applied, before the messages move (a cancel marks them first)."""
        elsewhere = 0
        while True:
            raw = self.r.hget(PENDING, batch_id)
            if not raw:
                return elsewhere
            staging = Staging.from_json(batch_id, raw)
            step = int(json.loads(raw)["next"])
            keys = [
                PENDING,
                batch_key(batch_id, "state"),
                batch_key(batch_id, "counts"),
                batch_key(batch_id, "cmd"),
                batch_key(batch_id),
                staging.messages_key,
                staging.queue or batch_key(batch_id, "noqueue"),
                *staging.chunk_keys(step),
                batch_key(batch_id, "failed"),
                staging.keys_key(step),
                *ending_keys(batch_id),
            ]
            args = [batch_id, staging.sid, step, CHUNK, index_key(""), INDEX_DIGITS]
            args += [_NAMESPACE.bytes, batch_key(""), int(not messages), int(DEFAULT_KEEP)]
            # 'more' or 'stale': read the record again (the next step may use other keys)
            outcome, _, found = str(self._run("apply", keys, args)).partition(":")
            elsewhere += int(found or 0)
            if outcome in ("done", "states"):
                return elsewhere

    def pending(self) -> list[str]:
        """Batches with a committed submission still being applied."""
        return [str(b) for b in self.r.hkeys(PENDING)]

    def apply_pending(self) -> None:
        """Carry out every committed submission still being applied (their submitters may
        have died): before judging the queue, or tidying."""
        for batch_id in self.pending():
            self.apply(batch_id)
            raw = self.r.hget(PENDING, batch_id)
            if raw and json.loads(raw).get("cancel"):  # its canceller died before marking it
                self.cancel(batch_id)

    def hold(self, staging: Staging, file_key: str, after: Sequence[str]) -> None:
        """Keep a staged submission (no expiry) until every batch in `after` is done."""
        pipe: Any = self.r.pipeline(transaction=True)
        for key in staging.all_keys():
            pipe.persist(key)
        hold = {"after": list(after), "file_key": file_key, "staging": staging.to_json()}
        pipe.hset(HELD, staging.batch_id, json.dumps(hold))
        pipe.execute()

    def release(self, batch_id: str, *, cancel: str = "") -> bool:
        """Commit the held submission of `batch_id` now: True if this call did, False if it
        was not held (any more). With `cancel` (why, shown by `status` from its metadata) it is
        committed to be cancelled in the same step: no one applies its messages until every
        command of it is marked cancelled (`cancel`, which this call then does)."""
        hold = self.held().get(batch_id)
        if hold is None:
            return False
        staging: Staging = hold["staging"]
        if cancel:  # staged: it arrives with the commit, or not at all
            self.r.hset(staging.whole_keys[0], "dependency", _enc(cancel))
        extra = {"cancel": True} if cancel else {}
        if self.commit(staging, hold["file_key"], releasing=True, pending=extra) < 0:
            return False
        if cancel:
            self.cancel(batch_id)
        return True

    def held(self) -> dict[str, dict[str, Any]]:
        """batch -> {after, file_key, staging}: submissions waiting for other batches."""
        out = {}
        for b, v in self.r.hgetall(HELD).items():
            hold = json.loads(v)
            out[b] = {**hold, "staging": Staging.from_json(b, hold["staging"])}
        return out

    def discard(self, staging: Staging) -> None:
        """Remove whatever a failed submit staged: the batch itself, and the command index
        (written only once a submission is committed), are untouched."""
        self.r.unlink(*staging.all_keys())

    def batch_for_file(self, file_key: str) -> str | None:
        """The batch an earlier submission of this file (same path, same cwd) created."""
        found = self.r.hget(FILES, file_key)
        return str(found) if found else None

    def states_of(self, batch_id: str, task_ids: Sequence[str]) -> dict[str, str]:
        if not task_ids:
            return {}
        out = {}
        key = batch_key(batch_id, "state")
        for i in range(0, len(task_ids), CHUNK):
            chunk = list(task_ids[i : i + CHUNK])
            out.update({t: s for t, s in zip(chunk, self.r.hmget(key, chunk), strict=True) if s})
        return out

    def live_tasks(self, keys: Iterable[str]) -> dict[str, tuple[str, str, str]]:
        """For command keys, the (batch, task, state) of their latest task, where one exists."""
        keys = list(keys)
        if not keys:
            return {}
        found: dict[str, tuple[str, str]] = {}
        legacy = bool(self.r.exists(LEGACY_INDEX))
        for i in range(0, len(keys), CHUNK):
            buckets: dict[str, list[str]] = {}
            for key in keys[i : i + CHUNK]:
                buckets.setdefault(index_key(key), []).append(key)
            pipe = self.r.pipeline(transaction=False)
            for bucket, some in buckets.items():
                pipe.hmget(bucket, some)
            for some, values in zip(buckets.values(), pipe.execute(), strict=True):
                for key, b in zip(some, values, strict=True):
                    if b:
                        found[key] = (b, task_id_for(b, key))
            missing = [k for k in keys[i : i + CHUNK] if k not in found] if legacy else []
            if missing:
                for key, v in zip(missing, self.r.hmget(LEGACY_INDEX, missing), strict=True):
                    if v:  # "B" or, older still, "B|task"
                        b, _, t = v.partition("|")
                        found[key] = (b, t or task_id_for(b, key))
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
        self,
        batch_id: str,
        task_id: str,
        node: str,
        token: str,
        state: str,
        record: dict[str, Any],
        *,
        ran: bool = True,
    ) -> str:
        """Record the outcome of one attempt: 'ok', 'not-owner' (nothing recorded) or the state
        the command had left `running` for (cancelled). An attempt in which nothing ran
        (`ran=False`: skipped, refused) has no line in the run log: it has no time to show."""
        keys = [
            *_task_keys(batch_id, task_id),
            batch_key(batch_id, "result"),
            batch_key(batch_id, "ended"),
            batch_key(batch_id),
            batch_key(batch_id, "runs"),
            batch_key(batch_id, "failed"),
        ]
        args = [
            task_id,
            member(batch_id, task_id),
            node,
            token,
            state,
            json.dumps(record),
            record.get("duration", 0.0),
            run_line(record) if ran else "",
            batch_id,
            int(DEFAULT_KEEP),
        ]
        return str(self._run("finish", [*keys, *ending_keys(batch_id)], args))

    def requeue(
        self,
        batch_id: str,
        task_id: str,
        token: str,
        *,
        limit: int,
        count_loss: bool = True,
        ignore_heartbeat: bool = False,
        delay: float = 0.0,
        record: dict[str, Any] | None = None,
    ) -> str:
        """Take a task from runner `token`: 'requeued', 'lost' (crash limit), 'alive' or 'gone'.
        A requeued task is owed a message from `delay` seconds on (see `republish_owed`)."""
        keys = [
            *_task_keys(batch_id, task_id),
            batch_key(batch_id, "attempts"),
            batch_key(batch_id, "result"),
            batch_key(batch_id, "ended"),
            batch_key(batch_id, "failed"),
            OWED,
            batch_key(batch_id, "runs"),
        ]
        args = [task_id, member(batch_id, task_id), token, limit, int(count_loss)]
        args += [int(ignore_heartbeat), batch_id, int(DEFAULT_KEEP), delay]
        # a retried attempt's record, and its line in the run log: it ran, and failed
        args += [json.dumps(record), run_line(record)] if record is not None else ["", ""]
        return str(self._run("release", [*keys, *ending_keys(batch_id)], args))

    def hand_back(
        self,
        batch_id: str,
        task_id: str,
        token: str,
        delay: float = 0.0,
        record: dict[str, Any] | None = None,
    ) -> str:
        """The owner gives its command up, unfailed (not a loss): 'requeued' (queue it again,
        in `delay` seconds, keeping `record` of the attempt), or 'gone' (cancelled meanwhile,
        or not ours any more)."""
        return self.requeue(
            batch_id,
            task_id,
            token,
            limit=1,
            count_loss=False,
            ignore_heartbeat=True,
            delay=delay,
            record=record,
        )

    def owe(self, batch_id: str, task_id: str) -> None:
        """A queued command's message was taken and is to be published again: owed from now."""
        self.r.zadd(OWED, {member(batch_id, task_id): self.redis_time()})

    def owed(self, until: float, count: int = CHUNK) -> list[str]:
        """Members ("B|task") owed a message since before Redis time `until`."""
        return [str(m) for m in self.r.zrangebyscore(OWED, "-inf", until, start=0, num=count)]

    def paid(self, batch_id: str, task_id: str) -> None:
        """A message was published for the command by other means (Celery's retry)."""
        self.r.zrem(OWED, member(batch_id, task_id))

    def node_fault(
        self,
        batch_id: str,
        task_id: str,
        node: str,
        token: str,
        reason: dict[str, Any],
        live_window: float,
        again_delay: float = 0.0,
    ) -> str:
        """Hand a command back for a reason of this node, which goes on with other work:
        'requeued', 'again' (this node had refused it before), 'failed' (every node taking
        commands refused it), 'gone' or 'not-owner'."""
        keys = [
            *_task_keys(batch_id, task_id),
            batch_key(batch_id, "result"),
            batch_key(batch_id, "ended"),
            batch_key(batch_id, "refusals"),
            ALIVE,
            QUARANTINE,
            batch_key(batch_id, "failed"),
            OWED,
            FAULTS,
        ]
        args = [task_id, member(batch_id, task_id), node, token, json.dumps(reason), live_window]
        args += [batch_id, int(DEFAULT_KEEP), again_delay]
        return str(self._run("node_fault", [*keys, *ending_keys(batch_id)], args))

    def cancel(self, batch_id: str) -> int:
        """Mark queued and running tasks cancelled, a bounded step at a time; their runners are
        nudged to renew at once, and stop (a missed nudge: at their next renewal). A submission
        committed and not yet applied is applied first, so nothing it queues escapes."""
        keys = [batch_key(batch_id, "state"), batch_key(batch_id, "counts"), batch_key(batch_id)]
        keys += ending_keys(batch_id)
        cursor, total = "0", 0
        while True:
            cursor, n = self._run("cancel", keys, [cursor, CHUNK, batch_id, int(DEFAULT_KEEP)])
            if cursor == "pending":  # a committed submission's changes first, whoever began it
                self.apply(batch_id, messages=False)
                cursor = "0"
                continue
            total += int(n)
            if str(cursor) == "0":
                break
        self.apply(batch_id)  # its messages, if one was pending: the claims drop them
        # the runners renew now instead of at their next heartbeat, and so see the cancel; a
        # nudge is a courtesy (a user without pub/sub rights: the renewals do it)
        with contextlib.suppress(redis.RedisError):
            self.r.publish(CANCEL_CHANNEL, batch_id)
        return total

    # -- retention -------------------------------------------------------------------------------

    def active(self) -> list[str]:
        """Batches that have not ended (something queued, running or being applied)."""
        return [str(b) for b in self.r.smembers(ACTIVE)]

    def end(self, batch_id: str, keep: float) -> bool:
        """If the batch has nothing queued or running, it has ended: its keys expire after
        `keep` seconds. True if it ended now."""
        return bool(self._run("end", ending_keys(batch_id), [batch_id, max(1, int(keep))]))

    def forget(self, batch_id: str) -> int:
        """Drop every record of a batch now; returns the number of keys removed."""
        removed = 0
        names = [batch_key(batch_id)]
        for key in self.r.scan_iter(match=batch_key(batch_id, "*"), count=1000):
            names.append(key)
            if len(names) >= 500:
                removed += self.r.unlink(*names)
                names = []
        if names:
            removed += self.r.unlink(*names)
        self.drop_references({batch_id})
        return removed

    def expired(self) -> set[str]:
        """Batches still listed whose records have expired."""
        ids = self.batch_ids()
        pipe = self.r.pipeline(transaction=False)
        for b in ids:
            pipe.exists(batch_key(b))
        return {b for b, there in zip(ids, pipe.execute(), strict=True) if not there}

    def drop_references(self, gone: set[str]) -> int:
        """Remove what points to batches that are gone: their entries in the batch list, the
        active set, holds, files and the command index (scanned a chunk at a time)."""
        if not gone:
            return 0
        pipe = self.r.pipeline(transaction=False)
        pipe.zrem(BATCHES, *gone)
        pipe.srem(ACTIVE, *gone)
        pipe.hdel(PENDING, *gone)
        pipe.hdel(HELD, *gone)
        pipe.execute()
        # fsl_sub's job ids (fsl/jobs.py): a hash per job naming its batch
        jobs = list(self.r.scan_iter(match=PREFIX + "job:*", count=1000))
        if jobs:
            pipe = self.r.pipeline(transaction=False)
            for job in jobs:
                pipe.hget(job, "batch")
            ended_jobs = [j for j, b in zip(jobs, pipe.execute(), strict=True) if b in gone]
            if ended_jobs:
                self.r.unlink(*ended_jobs)
        dropped = self._drop_stale(FILES, self.r.hscan_iter(FILES, count=CHUNK), gone)
        if self.r.exists(LEGACY_INDEX):
            # the steps it was swept in before the split: a quarter of the usual
            entries = self.r.hscan_iter(LEGACY_INDEX, count=CHUNK // 4)
            dropped += self._drop_stale(LEGACY_INDEX, entries, gone, step=CHUNK // 4)
        return dropped + self._sweep_index(gone)

    def _sweep_index(self, gone: set[str]) -> int:
        """Drop the command index's entries that name these batches, a bucket at a time."""
        dropped, buckets = 0, index_buckets()
        for i in range(0, len(buckets), 64):
            pipe = self.r.pipeline(transaction=False)
            for bucket in buckets[i : i + 64]:
                pipe.hgetall(bucket)
            for bucket, entries in zip(buckets[i : i + 64], pipe.execute(), strict=True):
                if entries:
                    dropped += self._drop_stale(bucket, entries.items(), gone)
        return dropped

    def _drop_stale(
        self, key: str, entries: Iterable[tuple[str, str]], gone: set[str], step: int = CHUNK
    ) -> int:
        """Drop the entries of hash `key` whose value names a gone batch, `step` per script."""
        dropped, stale = 0, []
        for field, value in entries:
            if value.partition("|")[0] in gone:
                stale += [field, value]
            if len(stale) >= 2 * step:
                dropped += int(self._run("drop_entries", [key], stale))
                stale = []
        if stale:
            dropped += int(self._run("drop_entries", [key], stale))
        return dropped

    # -- nodes ----------------------------------------------------------------------------------

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
        beats, stopping, quarantine, faults = pipe.execute()
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

    def redis_time(self) -> float:
        """Redis's clock, the one every host's comparisons use."""
        seconds, micros = self.r.time()
        return float(seconds) + float(micros) / 1e6

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

    def holders(self, batch_id: str) -> int:
        """Runners that still hold a command of the batch (a cancelled one may be stopping)."""
        return sum(1 for _ in self.r.hscan_iter(RUNNING, match=f"{batch_id}|*", count=1000))

    def attempt_of(self, batch_id: str, task_id: str) -> tuple[int, int]:
        """(line, attempt) of a command its runner has just claimed: the claim counts attempts
        (lua/claim.lua), so every attempt of a command, in any worker, has a number of its own."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hget(batch_key(batch_id, "cmd"), task_id)
        pipe.hget(batch_key(batch_id, "attempts"), task_id)
        spec, attempts = pipe.execute()
        line = int(json.loads(spec).get("line", 0)) if spec else 0
        return line, int(attempts or 1)

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
        """Everything `status` needs, in a fixed number of commands; times are Redis's, like
        those the workers record. `recent` counts the commands that ended in the `window`
        before `until`: now while the batch runs, its last command's end once it has ended
        (so that an ended batch's figures stay as they were at its end)."""
        now = self.redis_time()
        pipe = self.r.pipeline(transaction=False)
        pipe.hgetall(batch_key(batch_id))
        pipe.hgetall(batch_key(batch_id, "counts"))
        pipe.hgetall(batch_key(batch_id, "nodes"))
        pipe.zcount(batch_key(batch_id, "ended"), now - window, "+inf")
        pipe.hexists(PENDING, batch_id)
        pipe.hmget(batch_key(batch_id, "attempts"), ["requeued", "lost"])
        meta, counts, nodes, recent, applying, (requeued, lost) = pipe.execute()
        if not meta or "committed" not in meta:
            raise BatchNotFound(f"batch {batch_id!r} not found (see `tbss-queue batches`)")
        counts = {k: int(v) for k, v in counts.items()}
        until = now
        busy = counts.get(QUEUED, 0) + counts.get(RUNNING_STATE, 0)
        last = meta.get("last_ended")
        if not busy and not applying and last:  # ended: frozen at its last command's end
            until = float(last)
            recent = self.r.zcount(batch_key(batch_id, "ended"), until - window, until)
        return {
            "meta": {k: _dec(v) for k, v in meta.items()},
            "counts": counts,
            "nodes": nodes,
            "recent": int(recent),
            "applying": bool(applying),
            "requeued": int(requeued or 0),
            "lost": int(lost or 0),
            "now": now,
            "until": until,
            "window": window,
        }

    def task_specs(
        self, batch_id: str, task_ids: Sequence[str] | None = None
    ) -> dict[str, dict[str, Any]]:
        """task id -> {line, argv, key, note}: every task of the batch, or the ones named."""
        return self._json_fields(batch_key(batch_id, "cmd"), task_ids)

    def states(self, batch_id: str) -> dict[str, str]:
        """task id -> state, read a chunk at a time (one HGETALL of a million entries would
        block Redis for a second)."""
        return dict(self.r.hscan_iter(batch_key(batch_id, "state"), count=CHUNK))

    def results(
        self, batch_id: str, task_ids: Sequence[str] | None = None
    ) -> dict[str, dict[str, Any]]:
        """task id -> record of its last attempt: every task that has one, or the ones named."""
        return self._json_fields(batch_key(batch_id, "result"), task_ids)

    def _json_fields(self, key: str, fields: Sequence[str] | None) -> dict[str, dict[str, Any]]:
        """The JSON values of a hash: all of them, or those of `fields` that exist; read a
        chunk at a time."""
        if fields is None:
            return {f: json.loads(v) for f, v in self.r.hscan_iter(key, count=CHUNK)}
        out = {}
        for i in range(0, len(fields), CHUNK):
            part = list(fields[i : i + CHUNK])
            raw = self.r.hmget(key, part)
            out.update({f: json.loads(v) for f, v in zip(part, raw, strict=True) if v})
        return out

    def runs(self, batch_id: str) -> list[str]:
        """The batch's run log, a line per recorded attempt (see `run_line`), oldest first,
        read a chunk at a time."""
        key, out = batch_key(batch_id, "runs"), []
        for start in range(0, self.r.llen(key), 5 * CHUNK):
            out += self.r.lrange(key, start, start + 5 * CHUNK - 1)
        return out

    def failed_ids(self, batch_id: str) -> list[str]:
        """The commands of the batch that are failed now."""
        return [str(t) for t in self.r.smembers(batch_key(batch_id, "failed"))]

    def running(self, batch_id: str | None = None) -> dict[str, dict[str, Any]]:
        """Running records ("batch|task" -> record), optionally of one batch."""
        out = {}
        for m, v in self.r.hgetall(RUNNING).items():
            if batch_id is None or m.startswith(batch_id + "|"):
                out[m] = json.loads(v)
        return out


RUN_FIELDS = ("line", "node", "slot", "started", "ended", "state")
"""The tab-separated fields of a run-log line; finish.lua appends the state."""


def run_line(record: dict[str, Any]) -> str:
    """An attempt's line in the run log, but its state (node and slot have no tabs)."""
    slot = record.get("slot")
    return "\t".join(
        (
            str(record.get("line", 0)),
            str(record.get("node") or "?"),
            str(-1 if slot is None else slot),
            f"{float(record['started']):.3f}",
            f"{float(record['ended']):.3f}",
        )
    )


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
    """Staged keys vanish on their own if the submit dies before its commit."""
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
