"""Getting tasks back from workers that are gone, exactly once.

Celery's Redis transport returns an unacknowledged message only after the visibility timeout,
which must outlive the longest command (hours). So a node killed mid-task would leave its
commands idle for hours. Instead, every running command holds a lease its runner renews; any
worker that sees a running record whose lease has lapsed takes it back (one Lua script decides,
so exactly one reaper wins) and publishes the task again, at the front of the queue. A stale copy
that Redis restores later finds the task finished or running and is dropped by the claim in
`lease.claimed`; the old runner, if it is only slow, finds its lease gone and records nothing.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from typing import Any

from celery import Celery
from kombu import serialization

from tbss_queue.config import Settings
from tbss_queue.queue.batches import BatchStore
from tbss_queue.queue.broker import BROKER
from tbss_queue.queue.keys import (
    CANCELLED,
    CHUNK,
    FAILED,
    HELD,
    OWED,
    PENDING,
    QUEUED,
    RUNNING_STATE,
    TaskSpec,
    batch_key,
    member,
)
from tbss_queue.queue.publish import (
    REF_HEADER,
    build_messages,
    label,
    new_message_id,
    send_options,
    task_kwargs,
)

log = logging.getLogger(__name__)

# kombu's Redis transport: delivered, unacknowledged messages (its default key names)
KOMBU_UNACKED, KOMBU_UNACKED_INDEX = "unacked", "unacked_index"


def republish(
    app: Celery,
    store: BatchStore,
    settings: Settings,
    batch_id: str,
    task_id: str,
    *,
    front: bool = True,
) -> bool:
    """Send a command's message again, to the FRONT of the queue (it was lost or handed back:
    it has waited its turn already), or to its back (`front=False`: a node that cannot run it
    goes on with what waits behind it), with a fresh message id.

    With message signing the records in Redis are not trusted: only the submitter's own signed
    message is sent again, after checking its signature; False if there is none to send.
    """
    spec = store.task_specs(batch_id, [task_id])[task_id]
    if settings.signing:
        raw = _signed(app, spec.get("message"), batch_id, task_id)
        if raw is None:
            return False
    else:
        meta = store.meta(batch_id)
        again = TaskSpec(task_id, spec["line"], tuple(spec["argv"]), "")
        [(_, raw)] = build_messages(
            app,
            batch_id,
            meta["cwd"],
            [again],
            task_kwargs(meta),
            send_options(settings.time_limit, meta),
        )
    # kombu's consumers pop from the right end (BRPOP): RPUSH is the front; and the debt the
    # requeue recorded is paid in the same step (a lost reply here leaves it to be paid again)
    pipe = store.r.pipeline(transaction=True)
    (pipe.rpush if front else pipe.lpush)(settings.queue, raw)
    pipe.zrem(OWED, member(batch_id, task_id))
    pipe.execute()
    return True


def republish_owed(app: Celery, store: BatchStore, settings: Settings) -> int:
    """Publish the message of every command requeued more than a heartbeat ago whose message
    never came: its requeuer lost the reply to its requeue, or died before it published. Per
    command, so one lost reply is repaired within a heartbeat or two of when its message was
    due, whatever else runs. A debt of a command no longer queued is dropped."""
    republished = 0
    for owed in store.owed(store.redis_time() - settings.heartbeat):
        batch_id, task_id = owed.split("|", 1)
        state = store.r.hget(batch_key(batch_id, "state"), task_id)
        if state == QUEUED and republish(app, store, settings, batch_id, task_id):
            republished += 1
            log.warning("published command %s of batch %s again: its message never came",
                        task_id, batch_id)  # fmt: skip
        else:
            store.r.zrem(OWED, owed)
    return republished


_unsendable: set[str] = set()


def _signed(app: Celery, raw: str | None, batch_id: str, task_id: str) -> str | None:
    """The submitter's signed message, if its signature holds, with a fresh delivery tag."""
    try:
        if not raw:
            raise ValueError("no signed message was stored")
        message = json.loads(raw)
        body = message["body"]
        if message["properties"].get("body_encoding") == "base64":
            body = base64.b64decode(body)
        # raises unless signed by a certificate of the trusted store
        serialization.loads(
            body,
            message["content-type"],
            message["content-encoding"],
            accept=app.conf.accept_content,
        )
    except Exception as exc:  # any doubt means: do not send
        if task_id not in _unsendable:
            _unsendable.add(task_id)
            log.error("not publishing task %s of batch %s again: %s", task_id, batch_id, exc)
        return None
    # a fresh delivery tag, so kombu does not confuse it with the lost copy (not signed data)
    message["properties"]["delivery_tag"] = new_message_id()
    return json.dumps(message)


def heartbeats_judgeable(store: BatchStore, settings: Settings) -> bool:
    """False until Redis has been up long enough for every live runner to have beaten again.

    Heartbeats can't be written while Redis is down, and those that expired meanwhile are gone
    after it reloads its data: right after a restart every running command looks dead.
    """
    return store.redis_uptime() >= settings.lost_after + 2 * settings.heartbeat


def requeue_lost(
    app: Celery, store: BatchStore, settings: Settings, *, everything: bool = False
) -> dict[str, int]:
    """Requeue running tasks whose heartbeat expired (all running tasks if `everything`).

    `everything` is for a restart where no worker can be alive (embedded mode): those tasks
    were interrupted, not crashed, so it does not count towards the crash limit.
    """
    counts = {"requeued": 0, "lost": 0}
    if not everything and not heartbeats_judgeable(store, settings):
        return counts
    for held, record in store.running().items():
        batch_id, task_id = held.split("|", 1)
        if not everything and store.lease_alive(batch_id, task_id):
            continue
        outcome = store.requeue(
            batch_id,
            task_id,
            record["token"],
            limit=settings.crash_limit,
            count_loss=not everything,
            ignore_heartbeat=everything,
        )
        if outcome in ("requeued", "lost"):
            argv = store.task_specs(batch_id, [task_id]).get(task_id, {}).get("argv")
            log.warning(
                "%s %s (batch %s, command %s): its node %s stopped answering",
                "requeued" if outcome == "requeued" else "failed as lost after repeated losses:",
                label(argv) if argv else "?",
                batch_id,
                task_id,
                record["node"],
            )
        if outcome == "requeued":
            republish(app, store, settings, batch_id, task_id)
        if outcome in counts:
            counts[outcome] += 1
    return counts


class Stalled:
    """Messages a worker took but never started (it died, or was cut off before it claimed).

    They sit in kombu's `unacked` hash, which kombu itself restores only after the visibility
    timeout (hours). One that this reaper has seen there for `lost_after` whose command is not
    running is stalled: kombu's own restore_by_tag puts it back at the front (atomically: one
    reaper wins). Ages are this reaper's own observations, never another host's clock.
    """

    def __init__(self) -> None:
        self.first_seen: dict[str, float] = {}

    def restore(self, app: Celery, store: BatchStore, settings: Settings) -> int:
        restored = 0
        if not heartbeats_judgeable(store, settings):
            return restored
        now = time.monotonic()
        tags = set(store.r.hkeys(KOMBU_UNACKED))
        self.first_seen = {t: self.first_seen.get(t, now) for t in tags}
        old = [t for t, seen in self.first_seen.items() if now - seen >= settings.lost_after]
        if not old:
            return restored
        with app.connection_for_write() as conn:
            channel = conn.default_channel
            for tag in old:
                raw = store.r.hget(KOMBU_UNACKED, tag)
                ref = _batch_and_task(raw) if raw else None
                if ref is None:
                    continue
                batch_id, task_id = ref
                if store.states_of(batch_id, [task_id]).get(task_id) == RUNNING_STATE:
                    continue  # a live command (or one the lease check requeues)
                channel.qos.restore_by_tag(tag, leftmost=False)
                self.first_seen.pop(tag, None)
                restored += 1
                log.warning(
                    "restored task %s of batch %s: taken by a worker that never ran it",
                    task_id,
                    batch_id,
                )
        return restored


def _ref(message: dict[str, Any]) -> tuple[str, str] | None:
    """(batch id, command id) of a task message, from its tbssq header."""
    ref = message.get("headers", {}).get(REF_HEADER)
    if not isinstance(ref, str) or "|" not in ref:
        return None
    batch_id, task_id = ref.split("|", 1)
    return batch_id, task_id


def _batch_and_task(raw: str) -> tuple[str, str] | None:
    """(batch id, command id) of a kombu unacked entry: [message, exchange, routing key]."""
    try:
        return _ref(json.loads(raw)[0])
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None


def missing_messages(store: BatchStore, settings: Settings) -> int:
    """How many queued tasks at least have no message (0 when queue and records agree).

    O(number of active batches): queued counters against the queue's length, kombu's unacked
    hash and the messages still staged for a submission being applied. Messages of finished
    tasks only inflate the right side, so a positive number is sure.
    """
    batch_ids = store.active()
    pipe = store.r.pipeline(transaction=False)
    for b in batch_ids:
        pipe.hget(batch_key(b, "counts"), QUEUED)
    pipe.llen(settings.queue)
    pipe.hlen(KOMBU_UNACKED)
    pipe.hlen(PENDING)
    *queued, in_queue, unacked, pending = pipe.execute()
    if pending:
        return 0  # messages are on their way (BatchStore.apply): judge when they are there
    return sum(int(q or 0) for q in queued) - int(in_queue) - int(unacked)


def republish_orphans(app: Celery, store: BatchStore, settings: Settings) -> int:
    """Publish again every queued task that has no message in the queue or in kombu's unacked
    hash: its message was lost (a worker took it, then Redis died before kombu recorded it).
    Reads the queue and the active batches' states a chunk at a time."""
    present: set[str | None] = set()
    for start in range(0, store.r.llen(settings.queue), CHUNK):
        part = store.r.lrange(settings.queue, start, start + CHUNK - 1)
        present |= {_task_id(raw) for raw in part}
    present |= {ref[1] for raw in store.r.hvals(KOMBU_UNACKED) if (ref := _batch_and_task(raw))}
    present.discard(None)
    republished = 0
    for batch_id in store.active():
        for task_id, state in store.states(batch_id).items():
            if state == QUEUED and task_id not in present:
                republished += republish(app, store, settings, batch_id, task_id)
    if republished:
        log.warning("published %d queued tasks again: their messages were lost", republished)
    return republished


def reconcile(app: Celery, store: BatchStore, settings: Settings) -> dict[str, int]:
    """Make queue and records agree after a stop where no worker survived (embedded restart).

    Running tasks go back to queued, kombu's unacked messages (their workers are gone) are
    dropped, and every queued task without a message is published again.
    """
    store.apply_pending()  # staged messages are published, not taken for lost
    counts = requeue_lost(app, store, settings, everything=True)
    store.r.delete(KOMBU_UNACKED, KOMBU_UNACKED_INDEX)
    counts["republished"] = republish_orphans(app, store, settings)
    return counts


def _task_id(raw: Any) -> str | None:
    """The command id of a queued message."""
    try:
        ref = _ref(json.loads(raw) if isinstance(raw, str) else raw)
    except (ValueError, TypeError, AttributeError):
        return None
    return ref[1] if ref else None


def release_held(store: BatchStore) -> list[str]:
    """Commit held submissions whose `after` batches have all ended (nothing queued/running).

    As Slurm's afterok: one whose `after` batch ended with failed or cancelled commands never
    runs; it comes to be cancelled, and its status says why ("dependency never satisfied")."""
    released = []
    for batch_id, hold in store.held().items():
        pending, unmet = 0, []
        if any(store.r.hexists(PENDING, o) or store.r.hexists(HELD, o) for o in hold["after"]):
            continue  # one it waits for has not come to be whole yet: its counts say nothing
        for other in hold["after"]:
            counts = store.r.hmget(batch_key(other, "counts"), QUEUED, "running", FAILED, CANCELLED)
            queued, running, failed, cancelled = (int(c or 0) for c in counts)
            pending += queued + running
            if failed or cancelled:
                unmet.append(f"batch {other} ended with {failed} failed, {cancelled} cancelled")
        if pending:
            continue
        if unmet:
            why = f"dependency never satisfied: {'; '.join(unmet)}"
            if store.release(batch_id, cancel=why):
                log.warning("batch %s will not run: %s", batch_id, why)
            continue
        if store.release(batch_id):
            store.apply(batch_id)
            log.warning("released batch %s: batches %s have ended", batch_id, hold["after"])
            released.append(batch_id)
    return released


def keep_tidy(store: BatchStore, settings: Settings) -> None:
    """Bookkeeping any worker may do: finish applying submissions whose submitter died, start
    the retention time of batches that ended, and drop what points to expired batches."""
    store.apply_pending()
    for batch_id in store.active():
        if store.end(batch_id, settings.keep):
            log.info("batch %s ended; its records are kept %g s", batch_id, settings.keep)
    gone = store.expired()
    if gone:
        store.drop_references(gone)
        log.info("forgot expired batch(es) %s", ", ".join(sorted(gone)))


class Reaper(threading.Thread):
    """Runs `requeue_lost` every few seconds in a worker's main process."""

    def __init__(self, app: Celery, settings: Settings, store: BatchStore) -> None:
        super().__init__(name="tbss-queue-reaper", daemon=True)
        self.app, self.settings, self.store = app, settings, store
        self.stopped = threading.Event()
        self.stalled = Stalled()

    def run(self) -> None:
        suspicious = False
        while not self.stopped.wait(self.settings.heartbeat):
            try:
                requeue_lost(self.app, self.store, self.settings)
                republish_owed(self.app, self.store, self.settings)
                self.stalled.restore(self.app, self.store, self.settings)
                release_held(self.store)
                keep_tidy(self.store, self.settings)
                # a message in flight shows as missing for a moment: act on the second sighting
                missing = missing_messages(self.store, self.settings) > 0
                if missing and suspicious:
                    republish_orphans(self.app, self.store, self.settings)
                    missing = False
                suspicious = missing
            except Exception as exc:  # a broker outage must not kill the worker; try again
                BROKER.failed("lost-task check", exc)
            else:
                BROKER.answered()
