"""The plain, frozen records the API returns; `to_dict()` is what `--json` prints."""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Batch:
    """One submission of one commands file."""

    id: str
    path: str
    cwd: str
    submitted: float
    total: int
    queued: int
    skipped: int  # not queued: their outputs exist, or they are live in another batch
    warnings: tuple[str, ...] = ()
    unchanged: int = 0  # a resubmission: already queued, running or succeeded in this batch

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "warnings": list(self.warnings)}


ONLINE, STOPPING, STOPPED, LOST, QUARANTINED, PAUSED = (
    "online",
    "stopping",
    "stopped",
    "lost",
    "quarantined",
    "paused",
)
"""A node's health: beating and taking commands; beating (or finishing its commands) but
taking no new one; stopped cleanly; no heartbeat for LOST_AFTER; taking none for a fault;
taking none for its owner policy (outside its --hours, or yielding to other processes'
load: its commands stopped, their leases kept)."""


def node_state(
    heartbeat_age: float | None,
    lost_after: float,
    stopping: bool,
    quarantined: bool,
    running: int = 0,
    paused: bool = False,
) -> str:
    """One definition of a node's health, for status, --watch, the report and `nodes`."""
    beating = heartbeat_age is not None and heartbeat_age < lost_after
    if stopping:
        return STOPPING if beating or running else STOPPED
    if not beating:
        return LOST
    if quarantined:
        return QUARANTINED
    return PAUSED if paused else ONLINE


@dataclass(frozen=True)
class NodeStatus:
    """What one worker node did for a batch, and its health now."""

    node: str
    running: int
    succeeded: int
    failed: int
    busy_seconds: float
    last_seen: float | None  # Redis time of its last claim or finish in this batch
    quarantined: str | None = None  # why this node takes no commands, if it takes none
    state: str = ""  # node_state(): online, stopping, stopped, lost, quarantined
    heartbeat_age: float | None = None  # seconds since its last heartbeat (None: never)
    requeued: int = 0  # its commands of this batch that went back to the queue
    cannot: tuple[str, ...] = ()  # what it found it cannot run (a study not mounted...)
    paused: str | None = None  # why it takes no commands for its owner policy, if paused

    @property
    def per_hour(self) -> float:
        """Commands finished per hour of command run time on this node (all its slots)."""
        done = self.succeeded + self.failed
        return 3600.0 * done / self.busy_seconds if self.busy_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "cannot": list(self.cannot), "per_hour": round(self.per_hour, 2)}


@dataclass(frozen=True)
class NodeInfo:
    """A worker node as the broker knows it: up or not, quarantined or not, what it runs."""

    node: str
    online: bool
    last_seen: float | None  # Redis time of its last heartbeat
    quarantined: str | None  # why it takes no commands (None: it takes them)
    facts: dict[str, Any] = field(default_factory=dict)
    state: str = ONLINE  # node_state(): online, stopping, stopped, lost, quarantined
    heartbeat_age: float | None = None  # seconds since its last heartbeat (Redis's clock)
    running: tuple[str, ...] = ()  # labels of the commands it runs now (any batch)
    cannot: tuple[str, ...] = ()  # what it found it cannot run; it takes other work
    paused: str | None = None  # why its owner policy pauses it (hours, others' load)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "running": list(self.running), "cannot": list(self.cannot)}


@dataclass(frozen=True)
class BatchStatus:
    """Counts, speed and ETA of a batch, read from counters the tasks maintain."""

    batch: str
    path: str
    cwd: str
    submitted: float
    total: int
    queued: int
    running: int
    succeeded: int
    failed: int
    skipped: int
    cancelled: int
    rate_recent: float  # commands finished per minute in the 10 minutes before `as_of`
    rate_overall: float  # per minute from the first start to `as_of`
    eta_seconds: float | None
    first_started: float | None
    last_ended: float | None
    nodes: tuple[NodeStatus, ...] = field(default=())
    warnings: tuple[str, ...] = field(default=())
    applying: bool = False
    """A committed submission is still being applied (its commands are about to be queued)."""
    as_of: float | None = None
    """Redis time the rates are measured at: now while the batch runs, its last command's end
    once it has ended (so an ended batch's figures never change)."""
    ended_at: float | None = None  # Redis time a worker's reaper saw the batch end
    requeued: int = 0  # times one of its commands went back to the queue (lost or handed back)
    lost: int = 0  # of which because its node was lost (no lease renewal)
    workers_online: int = 0  # nodes with a recent heartbeat (taking commands or not)
    no_worker_for: float | None = None
    """With no worker online: seconds since any was last heard from (or since submission)."""
    peak_rss: int | None = None
    """Bytes: the most memory one attempt's process tree held (its record has its own)."""

    @property
    def finished(self) -> int:
        return self.succeeded + self.failed + self.skipped + self.cancelled

    @property
    def done(self) -> bool:
        return self.queued == 0 and self.running == 0 and not self.applying

    @property
    def ok(self) -> bool:
        return self.done and self.failed == 0

    @property
    def elapsed_seconds(self) -> float | None:
        """From the first command's start to `as_of` (the end, once ended)."""
        if self.first_started is None or self.as_of is None:
            return None
        return max(0.0, self.as_of - self.first_started)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["nodes"] = [n.to_dict() for n in self.nodes]
        d["warnings"] = list(self.warnings)
        d["done"] = self.done
        d["finished"] = self.finished
        d["elapsed_seconds"] = self.elapsed_seconds
        return d


@dataclass(frozen=True)
class TaskRecord:
    """One command of a batch with its current state and last attempt."""

    task_id: str
    line: int
    argv: tuple[str, ...]
    state: str
    cause: str | None = None
    exit_code: int | None = None
    node: str | None = None
    duration: float | None = None
    stderr_tail: str = ""
    message: str = ""
    started: float | None = None
    ended: float | None = None
    slot: int | None = None  # the worker's pool process: one command at a time per slot
    attempt: int | None = None
    ran: tuple[str, ...] | None = None  # the argv that actually ran on the node (last attempt)
    ran_cwd: str | None = None  # and where
    peak_rss: int | None = None  # bytes: the most its whole process tree held (last attempt)

    @property
    def text(self) -> str:
        return shlex.join(self.argv)

    @property
    def ran_text(self) -> str:
        """What ran, where it differs from what was submitted (a path map, $FSLDIR, the
        program's full path): '' otherwise."""
        if self.ran is None or (self.ran == self.argv and self.ran_cwd is None):
            return ""
        text = shlex.join(self.ran)
        where = f" (in {self.ran_cwd})" if self.ran_cwd else ""
        return "" if text == self.text and not where else text + where

    @property
    def why(self) -> str:
        """Why it failed, in one line: its message, else the last line of its stderr."""
        return self.message or (self.stderr_tail.strip().splitlines() or [""])[-1]

    def to_dict(self) -> dict[str, Any]:
        # its fields are plain values: a shallow copy (asdict's deep one took 4 s for 20,000)
        ran = list(self.ran) if self.ran is not None else None
        return {**vars(self), "argv": list(self.argv), "ran": ran, "command": self.text}


@dataclass(frozen=True)
class Fleet:
    """The worker nodes' health as Redis sees it now (heartbeats and stop marks)."""

    now: float
    lost_after: float
    heartbeats: dict[str, float] = field(default_factory=dict)  # node -> last heartbeat
    stopping: dict[str, float] = field(default_factory=dict)  # node -> when it began to stop
    quarantine: dict[str, str] = field(default_factory=dict)  # node -> why
    faults: dict[str, tuple[str, ...]] = field(default_factory=dict)  # node -> what it can't run
    paused: dict[str, str] = field(default_factory=dict)  # node -> why (its owner policy)

    def state(self, node: str, running: int = 0) -> str:
        return node_state(
            self.age(node),
            self.lost_after,
            node in self.stopping,
            node in self.quarantine,
            running,
            paused=node in self.paused,
        )

    def age(self, node: str) -> float | None:
        beat = self.heartbeats.get(node)
        return None if beat is None else max(0.0, self.now - beat)

    def heartbeat_age(self, node: str) -> float | None:
        """`age`, to a tenth of a second: what status and `nodes` show."""
        age = self.age(node)
        return None if age is None else round(age, 1)

    def online(self) -> list[str]:
        return sorted(n for n in self.heartbeats if (self.age(n) or 0.0) < self.lost_after)

    def silent_for(self, since: float) -> float:
        """Seconds since any node was last heard from (`since` if none ever was later)."""
        last = max([since, *self.heartbeats.values(), *self.stopping.values()])
        return max(0.0, self.now - last)
