"""Getting tasks back from workers that are gone, exactly once.

Celery's Redis transport returns an unacknowledged message only after the visibility timeout,
which must outlive the longest command (hours). So a node killed mid-task would leave its
commands idle for hours. Instead, every running command keeps a heartbeat key alive; any worker
that sees a running record whose heartbeat has expired takes it back (one Lua script decides, so
exactly one reaper wins) and publishes the task again. A stale copy that Redis restores later
finds the task finished or running and is dropped by the claim in `tasks.execute`.
"""

from __future__ import annotations

import json
import logging
import shlex
import threading
from typing import Any

from celery import Celery

from .app import TASK_NAME
from .batches import QUEUED, RUNNING, BatchStore
from .config import Settings
from .publish import send_options, task_kwargs

log = logging.getLogger(__name__)


def republish(
    app: Celery, store: BatchStore, settings: Settings, batch_id: str, task_id: str
) -> None:
    """Send a task's message again, with the same id, as submit built it."""
    spec = store.task_specs(batch_id, [task_id])[task_id]
    meta = store.meta(batch_id)
    kwargs = task_kwargs(meta)
    app.send_task(
        TASK_NAME,
        args=(batch_id, spec["argv"], meta["cwd"]),
        kwargs=kwargs,
        task_id=task_id,
        argsrepr=shlex.join(spec["argv"]),
        kwargsrepr=repr(kwargs),
        **send_options(settings.time_limit, meta),
    )


def requeue_lost(
    app: Celery, store: BatchStore, settings: Settings, *, everything: bool = False
) -> dict[str, int]:
    """Requeue running tasks whose heartbeat expired (all running tasks if `everything`).

    `everything` is for a restart where no worker can be alive (embedded mode): those tasks
    were interrupted, not crashed, so it does not count towards the crash limit.
    """
    counts = {"requeued": 0, "lost": 0}
    for member, raw in store.r.hgetall(RUNNING).items():
        batch_id, task_id = member.split("|", 1)
        if not everything and store.heartbeat_alive(batch_id, task_id):
            continue
        record = json.loads(raw)
        outcome = store.requeue(
            batch_id,
            task_id,
            record["token"],
            limit=settings.crash_limit,
            count_loss=not everything,
            ignore_heartbeat=everything,
        )
        if outcome == "requeued":
            republish(app, store, settings, batch_id, task_id)
            log.warning(
                "requeued task %s of batch %s: its node %s stopped answering",
                task_id,
                batch_id,
                record["node"],
            )
        if outcome in counts:
            counts[outcome] += 1
    return counts


def reconcile(app: Celery, store: BatchStore, settings: Settings) -> dict[str, int]:
    """Make queue and records agree after a stop where no worker survived (embedded restart).

    Running tasks go back to queued, and every queued task without a message in the queue
    (its message was taken by a worker that then died) is published again.
    """
    counts = requeue_lost(app, store, settings, everything=True)
    queued_ids = set()
    for raw in store.r.lrange(settings.queue, 0, -1):
        queued_ids.add(_task_id(raw))
    # kombu's record of delivered, unacknowledged messages: their workers are gone
    store.r.delete("unacked", "unacked_index")
    republished = 0
    for batch_id in store.batch_ids():
        for task_id, state in store.states(batch_id).items():
            if state == QUEUED and task_id not in queued_ids:
                republish(app, store, settings, batch_id, task_id)
                republished += 1
    counts["republished"] = republished
    return counts


def _task_id(raw: Any) -> str | None:
    try:
        message = json.loads(raw) if isinstance(raw, str) else raw
        return str(message["headers"]["id"])
    except (ValueError, KeyError, TypeError):
        return None


class Reaper(threading.Thread):
    """Runs `requeue_lost` every few seconds in a worker's main process."""

    def __init__(self, app: Celery, settings: Settings, store: BatchStore) -> None:
        super().__init__(name="tbss-queue-reaper", daemon=True)
        self.app, self.settings, self.store = app, settings, store
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.settings.heartbeat):
            try:
                requeue_lost(self.app, self.store, self.settings)
            except Exception:  # a broker outage must not kill the worker; try again later
                log.warning("lost-task check failed; retrying", exc_info=True)
