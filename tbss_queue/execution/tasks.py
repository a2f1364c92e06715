"""The one Celery task, and its face to Celery: it builds the attempt (attempt.py runs it),
notes SIGTERM instead of dying of it, and ends an attempt that broke in this worker with a
record that says why (or hands it back, when the broker was what failed)."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task
from celery.exceptions import TaskPredicate

from tbss_queue.config import Settings
from tbss_queue.execution.attempt import Message, NodeRules, run_attempt
from tbss_queue.execution.interrupts import Interrupts
from tbss_queue.execution.lease import Attempt, CommandFailed, hand_back
from tbss_queue.execution.record import new_token, record_error, refuse
from tbss_queue.queue.app import TASK_NAME
from tbss_queue.queue.batches import BatchStore
from tbss_queue.queue.broker import connect, transient

log = logging.getLogger(__name__)

__all__ = ["CommandFailed", "NodeRules", "execute", "refuse_message", "register"]


def execute(
    task: Task, settings: Settings, rules: NodeRules, batch_id: str, task_id: str, message: Message
) -> dict[str, Any]:
    """Run one command of a batch, exactly once as far as the records can tell."""
    at = Attempt(
        settings, BatchStore(connect(settings, check=False)), task.request.hostname or "unknown",
        batch_id, task_id, new_token(), task.request.id or "", task.app,
    )  # fmt: skip
    with Interrupts().installed() as interrupts:
        try:
            return run_attempt(at, task, rules, interrupts, message)
        except (TaskPredicate, CommandFailed):
            raise
        except Exception as exc:
            if transient(exc):
                # the broker failed us past all patience, not the command: back to the queue
                # if Redis takes it now, else to the reaper once the lease lapses
                hand_back(at)
            else:
                # whatever broke in this worker, the attempt ends now and says why, rather
                # than stay claimed until its lease lapses and count as a lost node, again
                record_error(at, exc)
            raise


def refuse_message(
    store: BatchStore, settings: Settings, node: str, batch_id: str, task_id: str, why: str
) -> None:
    """Fail a command whose message the consumer turned away (not signed by a trusted key),
    saying why; no task runs it, so no waiting in the consumer's own loop."""
    at = Attempt(settings, store, node, batch_id, task_id, new_token(), patient=False)
    refuse(at, why)


def register(app: Celery, settings: Settings, rules: NodeRules | None = None) -> None:
    """Attach the task to `app`, closing over the settings the worker was started with."""
    node_rules = rules or NodeRules()

    @app.task(name=TASK_NAME, bind=True, throws=(CommandFailed,))
    def run_command(
        self: Task, batch_id: str, task_id: str, argv: list[str], cwd: str, **options: Any
    ) -> dict[str, Any]:
        # options: the per-batch ones publish.task_kwargs sends (time_limit, retries, ...)
        message = Message(argv, cwd, options)
        return execute(self, settings, node_rules, batch_id, task_id, message)
