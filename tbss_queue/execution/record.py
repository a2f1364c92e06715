"""The last stage of an attempt: its record, written once, by the owner of its lease.

Success and failure are recorded by `lua/finish.lua` under the runner's token (a runner that
lost the command records nothing); a failure with retries left is handed back with its record
(`lua/release.lua`) and sent again by Celery's retry after RETRY_DELAY.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from typing import Any

import redis
from billiard.process import current_process
from celery import Task
from celery.exceptions import Ignore, Retry

from tbss_queue.execution.lease import Attempt, Claim, CommandFailed, claim
from tbss_queue.execution.preflight import CAUSE_REFUSED
from tbss_queue.execution.runner import CAUSE_TOO_LONG, RunResult
from tbss_queue.queue.broker import patiently, replicated
from tbss_queue.queue.keys import FAILED, SUCCEEDED
from tbss_queue.queue.publish import RECORD_BUDGET

log = logging.getLogger(__name__)

CAUSE_WORKER_ERROR = "worker error"
RETRY_DELAY = 5.0
"""Seconds before a failed command is tried again (`--retries`)."""


def record_end(at: Attempt, state: str, record: dict[str, Any], *, ran: bool = True) -> str:
    """Write the attempt's outcome, waiting out a passing Redis fault, and make sure a replica
    holds it: 'ok', or why it was not recorded (not ours any more, cancelled)."""

    def finish() -> str:
        return at.store.finish(at.batch_id, at.task_id, at.node, at.token, state, record, ran=ran)

    by = time.monotonic() + RECORD_BUDGET  # both tries below share it: see HARD_LIMIT_MARGIN
    written = patiently(finish, RECORD_BUDGET)
    if written == "ok":
        try:
            replicated(at.store.r, at.settings)
        except redis.RedisError:
            # the master went away before a replica confirmed the record: write it again
            # on the new master ('not-owner' there means it had arrived)
            with contextlib.suppress(redis.RedisError):
                patiently(finish, max(0.0, by - time.monotonic()))
    return written


def outcome(
    at: Attempt, task: Task, retries: int, result: RunResult, record: dict[str, Any], name: str
) -> dict[str, Any]:
    """Succeeded, tried again (`retries` allowed), or failed: the result decides, and Celery
    is told (a return, a retry, or CommandFailed)."""
    if result.ok:
        log_outcome(record_end(at, SUCCEEDED, record), name, at)
        return {
            "exit_code": result.exit_code,
            "duration": round(result.duration, 3),
            "node": at.node,
        }
    if task.request.retries < retries and result.cause != CAUSE_TOO_LONG:
        # owed a message in RETRY_DELAY: Celery's retry sends it; if this hand-back's reply is
        # lost (or this process dies), a reaper does, within a heartbeat of when it was due
        back = patiently(
            lambda: at.store.hand_back(at.batch_id, at.task_id, at.token, RETRY_DELAY, record),
            at.patience,
        )
        if back == "requeued":
            try:
                task.retry(
                    countdown=RETRY_DELAY, max_retries=retries, exc=CommandFailed(result.message)
                )
            except Retry:
                with contextlib.suppress(redis.RedisError):
                    at.store.paid(at.batch_id, at.task_id)
                raise
        raise Ignore()
    log_outcome(record_end(at, FAILED, record), name, at)
    raise CommandFailed(result.message)


def attempt_record(at: Attempt, claim_: Claim, result: RunResult, **more: Any) -> dict[str, Any]:
    """What a run's record holds: the result, where and as which attempt it ran."""
    return {
        **result.to_dict(),
        "node": at.node,
        # the pool process's number; 0 outside a prefork pool (solo, threads)
        "slot": getattr(current_process(), "index", 0),
        **more,
        "attempt": claim_.number,
        "line": claim_.line,
    }


def nothing_ran(
    at: Attempt, message: str, cause: str | None = None, claim_: Claim | None = None
) -> dict[str, Any]:
    """The record of a claimed attempt in which nothing ran (skipped, refused, or cut short by
    the worker's own error): numbered and placed like any other, recorded with ran=False."""
    if claim_ is None:
        line, number = at.store.attempt_of(at.batch_id, at.task_id)
    else:
        line, number = claim_.line, claim_.number
    return {
        **RunResult.instant(message, cause).to_dict(),
        "node": at.node,
        "slot": getattr(current_process(), "index", 0),
        "line": line,
        "attempt": number,
    }


def refuse(at: Attempt, message: str) -> None:
    """Fail a command whose message this worker will not run (a field that does not pass the
    checks, a signature that does not hold), saying why: it must not stay queued for ever."""
    if claim(at, wait=0).outcome != "ok":
        return
    refused = nothing_ran(at, f"refused: {message}", CAUSE_REFUSED)
    patiently(
        lambda: at.store.finish(
            at.batch_id, at.task_id, at.node, at.token, FAILED, refused, ran=False
        ),
        at.patience,
    )


def record_error(at: Attempt, exc: Exception) -> None:
    """Fail the attempt this token holds with the worker's error (nothing is recorded if it
    holds none: the error came before the claim, or after the outcome was written)."""
    try:
        message = f"tbss-queue could not run it on {at.node}: {exc} ({type(exc).__name__})"
        record = nothing_ran(at, message, CAUSE_WORKER_ERROR)
        at.store.finish(at.batch_id, at.task_id, at.node, at.token, FAILED, record, ran=False)
    except Exception as lost:  # its lease lapses, and the reaper takes the command back
        log.error(
            "could not record the error of command %s of batch %s: %s", at.task_id, at.batch_id,
            lost,
        )  # fmt: skip


def log_outcome(outcome: str, name: str, at: Attempt) -> None:
    if outcome not in ("ok", "cancelled"):
        log.warning(
            "outcome of %s (command %s of batch %s) not recorded: %s",
            name, at.task_id, at.batch_id, outcome,
        )  # fmt: skip


def new_token() -> str:
    """A fresh lease token: one per attempt, never reused."""
    return uuid.uuid4().hex
