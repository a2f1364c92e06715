"""The layout of the queue's state in Redis: every key, the ids, and what is staged.

Batch bookkeeping in Redis: records, per-task states and the counters `status` reads.

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

import json
import secrets
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

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
PAUSED = PREFIX + "paused"
"""HASH node -> JSON {reason, since}: a node that takes no command for its owner policy
(--hours, --yield-load; execution/owner.py), and why."""
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


COMMAND_NAMESPACE = uuid.UUID("6b7c1f1e-2f55-4d0c-9a43-3c1f3e0a7b42")


def task_id_for(batch_id: str, command_key: str) -> str:
    """A command's id derives from batch and command: it can't be queued twice in a batch.

    It names the command in the batch records. Each Celery message carries a fresh id of its
    own (one row per attempt in Flower, and no id a worker remembers as revoked is ever reused);
    the command's id travels in the message's arguments and in its `tbssq` header. 16 hex
    digits (64 bits: no collision in a batch of millions) rather than a UUID's 36 characters:
    the id is stored five times per command."""
    return uuid.uuid5(COMMAND_NAMESPACE, f"{batch_id}|{command_key}").hex[:16]


def new_batch_id() -> str:
    """A short id a person can type: 8 hex digits."""
    return secrets.token_hex(4)


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


def task_keys(batch_id: str, task_id: str) -> list[str]:
    """KEYS[1..5] of the per-task scripts: state counts nodes running lease."""
    return [
        batch_key(batch_id, "state"),
        batch_key(batch_id, "counts"),
        batch_key(batch_id, "nodes"),
        RUNNING,
        lease_key(batch_id, task_id),
    ]


def expire_staged(pipe: Any, keys: Iterable[str]) -> None:
    """Staged keys vanish on their own if the submit dies before its commit."""
    for key in keys:
        pipe.expire(key, UNCOMMITTED_TTL)


def ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def enc(value: Any) -> str:
    return json.dumps(value)


def dec(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value
