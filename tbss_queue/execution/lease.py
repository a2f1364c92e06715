"""One owner per command: the claim, the lease its runner alone renews, and giving it back.

The claim gives a runner a lease (a token in Redis, expiring after LOST_AFTER) that only this
runner renews, at every heartbeat; whatever the old owner of a command does after losing it
(renew, record, hand back) is refused by the scripts, which compare tokens. A runner whose
renewal answers "not yours" or "cancelled", or that could not renew for LOST_AFTER minus two
heartbeats (a frozen machine, a cut network), kills its command's whole tree at once and
records nothing: by the time the reaper can give the command to another node (LOST_AFTER after
the last renewal), this copy is gone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, NamedTuple, NoReturn

import redis
from celery import Celery
from celery.exceptions import Ignore

from tbss_queue.config import Settings
from tbss_queue.execution.guard import uptime
from tbss_queue.execution.preflight import CAUSE_LATE, fault
from tbss_queue.execution.runner import Stop
from tbss_queue.queue.batches import BatchStore
from tbss_queue.queue.broker import connect, patiently, replicated
from tbss_queue.queue.recovery import republish

log = logging.getLogger(__name__)

LATE_LIMIT = 3
"""Leases a node's runners may lose by renewing late, within LATE_WINDOW, before it is
quarantined (cause CAUSE_LATE)."""
LATE_WINDOW = 10
"""The span, in LOST_AFTER periods, over which a node's late renewals are counted."""


class CommandFailed(Exception):
    """Raised (into Celery, so Flower shows FAILURE) when a command did not succeed."""


@dataclass(frozen=True)
class Attempt:
    """One delivery of one command on this node, and the token that will own it: what every
    stage of the attempt reads, and none changes."""

    settings: Settings
    store: BatchStore
    node: str
    batch_id: str
    task_id: str
    token: str
    delivery: str = ""
    """The Celery message's id (a row in Flower)."""
    app: Celery | None = None
    """The app to publish a message again with (None: the caller publishes nothing)."""
    patient: bool = True
    """Whether a step waits out a passing Redis fault (not in the consumer's own loop)."""

    @property
    def patience(self) -> float:
        """How long a step waits out a passing Redis fault before giving up."""
        return 10 * self.settings.lost_after if self.patient else 0.0

    def republish(self, *, front: bool = True) -> None:
        if self.app is not None:
            republish(self.app, self.store, self.settings, self.batch_id, self.task_id, front=front)


class Lease:
    """This runner's hold on one command: renewed at every tick, fenced by its token."""

    def __init__(self, at: Attempt, since: float) -> None:
        """`since`: when the claim was sent, by `uptime()`."""
        self.at = at
        settings = at.settings
        # a short socket timeout: a renewal must never block the tick loop past the lease
        self.store = BatchStore(connect(settings, check=False, timeout=settings.heartbeat / 2))
        self.margin = settings.runner_margin
        # by a clock that counts while the machine is suspended, shared with the guard process
        self.valid_until = since + self.margin

    def lapsed(self) -> bool:
        return uptime() >= self.valid_until

    def renew(self, _pid: int = 0) -> Stop | None:
        """None to go on, or why the command must stop now."""
        if self.lapsed():
            return Stop(
                f"could not renew its lease for {self.margin:g} s (machine paused or broker "
                "unreachable); another node may run it now",
                hard=True,
            )
        at, sent = self.at, uptime()
        try:
            verdict = self.store.renew(at.batch_id, at.task_id, at.token, at.settings.lost_after)
        except redis.RedisError as exc:
            log.warning("lease renewal of %s failed (%s); trying again", at.task_id, exc)
            return None
        if verdict == "ok":
            self.valid_until = sent + self.margin
            return None
        if verdict == "cancelled":
            return Stop("cancelled")
        return Stop("its lease was taken over: another node runs it now", hard=True)


@dataclass(frozen=True)
class Claim:
    """A command this runner owns: its lease, and where the attempt stands in the batch."""

    lease: Lease
    line: int
    number: int
    """The claim's count: every attempt, in any worker, has its own number and log files."""


class Reply(NamedTuple):
    """What a claim answered, and when it was sent by the clock the lease is kept by."""

    outcome: str
    line: int
    number: int
    sent: float


def claim(at: Attempt, *, wait: float | None = None) -> Reply:
    """Claim, waiting while the runner of an earlier attempt still holds the lease (a command
    cancelled and queued again: that runner lets go at its next renewal, or its lease lapses),
    for `wait` seconds (default: until that lease has surely lapsed)."""
    settings = at.settings
    if wait is None:
        wait = settings.lost_after + 2 * settings.heartbeat
    deadline = time.monotonic() + wait

    def once() -> Reply:
        # the lease lasts LOST_AFTER from the moment Redis runs the claim, later than this
        sent = uptime()
        outcome, line, number = at.store.claim(
            at.batch_id, at.task_id, at.node, at.token, settings.lost_after, os.getpid(),
            at.delivery,
        )  # fmt: skip
        return Reply(outcome, line, number, sent)

    while True:
        reply = patiently(once, at.patience)
        if reply.outcome != "leased" or time.monotonic() > deadline:
            return reply
        time.sleep(min(1.0, settings.heartbeat))


def claimed(at: Attempt) -> Claim:
    """The command, owned by this runner; or Ignore when it is not this runner's to run."""
    reply = claim(at)
    outcome = reply.outcome
    if outcome in ("quarantined", "leased"):
        # quarantined: this node takes no command until its fault is fixed; leased: an earlier
        # runner still holds it after all this time. Back to the front of the queue, unclaimed
        if outcome == "quarantined":
            time.sleep(at.settings.heartbeat)
        at.store.owe(at.batch_id, at.task_id)  # paid by the republish, or by a reaper if lost
        at.republish()
        raise Ignore()
    if outcome != "ok":
        raise Ignore()  # finished, cancelled, or running elsewhere: a duplicate message
    with contextlib.suppress(redis.RedisError):
        # a claim a replica holds survives a failover; one lost with the master shows at the
        # first renewal on the new master ("lost"), which kills this copy within a heartbeat
        replicated(at.store.r, at.settings)
    return Claim(Lease(at, reply.sent), reply.line, reply.number)


def go_on_if_still_ours(at: Attempt, lease: Lease, step: str) -> None:
    """Check the lease as the last step before `step` (removing outputs, starting the
    command): a runner held since its claim (a slow done check, a slow reply to the claim)
    may have lost the command to another node meanwhile, and then must touch nothing. Raises
    Ignore if so. The lease's clock started before the claim was sent, so while it says the
    lease holds, it does (Redis keeps it LOST_AFTER from the claim): no round trip is needed
    to know it."""
    if not lease.lapsed():
        return
    log.warning(
        "command %s of batch %s not ours any more before %s (its lease may have lapsed: "
        "no renewal for %g s): nothing done",
        at.task_id, at.batch_id, step, lease.margin,
    )  # fmt: skip
    count_late(at)
    raise Ignore()


def count_late(at: Attempt) -> None:
    """One more lease this node lost by being late; LATE_LIMIT of them within LATE_WINDOW
    lost-after periods quarantine it, so that its commands run elsewhere instead of being
    started and killed there again and again."""
    settings = at.settings
    window = LATE_WINDOW * settings.lost_after
    margin = settings.runner_margin
    message = (
        f"its runners lost {LATE_LIMIT} leases within {window:g} s, each time {margin:g} s "
        "without a renewal (the machine paused or overloaded, or Redis slow to reach from it)"
    )
    try:
        n, quarantined = at.store.late_renewal(
            at.node, LATE_LIMIT, window, fault(CAUSE_LATE, message, None)
        )
    except redis.RedisError:
        return  # the broker is what kept the renewals from arriving: the lease says the rest
    log.warning("lease lost by a late renewal (%d of %d before quarantine)", n, LATE_LIMIT)
    if quarantined and at.app is not None:
        log.error("node quarantined, taking no more commands: %s", message)
        at.app.control.cancel_consumer(settings.queue, destination=[at.node], reply=False)


def hand_back(at: Attempt) -> None:
    """Give the command up unfailed, if this attempt's token still holds it: cancelled, this
    releases the lease; else it goes back to the front of the queue. Not ours any more:
    nothing is done."""
    with contextlib.suppress(redis.RedisError):
        if at.store.hand_back(at.batch_id, at.task_id, at.token) == "requeued":
            at.republish()


def hand_back_fault(at: Attempt, fault: dict[str, Any]) -> NoReturn:
    """The command can't start on this node: back to the queue, behind what waits, and the node
    goes on with other work (or the command failed, if every node taking commands refused it).
    Always raises."""
    settings = at.settings
    outcome = patiently(
        lambda: at.store.node_fault(
            at.batch_id,
            at.task_id,
            at.node,
            at.token,
            fault,
            settings.lost_after,
            settings.heartbeat,
        ),  # fmt: skip
        at.patience,
    )
    if outcome in ("requeued", "again"):
        if outcome == "requeued":
            log.error("cannot run this command here, taking others: %s", fault["message"])
        else:  # taken here again: let another node come to it first
            time.sleep(settings.heartbeat)
        at.republish(front=False)
        raise Ignore()
    if outcome == "failed":
        raise CommandFailed(fault["message"])
    raise Ignore()
