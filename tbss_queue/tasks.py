"""The one Celery task: claim the command, run it, record the outcome. Thin by design."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any, TypeVar

import redis
from billiard.process import current_process
from celery import Celery, Task
from celery.exceptions import Ignore

from . import runner
from .app import TASK_NAME
from .batches import FAILED, SKIPPED, SUCCEEDED, BatchStore
from .broker import connect
from .config import Settings
from .done import done_marker, remove_stale
from .paths import PathMap, fsl_env, local_fsl_tool
from .policy import Policy
from .recovery import republish

log = logging.getLogger(__name__)
T = TypeVar("T")

CAUSE_MISSING_OUTPUT = "missing output"
CAUSE_REFUSED = "refused"
RETRY_DELAY = 5.0
"""Seconds before a failed command is tried again (`--retries`)."""


class CommandFailed(Exception):
    """Raised (into Celery, so Flower shows FAILURE) when a command did not succeed."""


def command_env(batch_id: str, task_id: str) -> dict[str, str]:
    """The environment a command runs in: the worker's, plus what FSL tools need."""
    # FSL refuses to write images with FSLOUTPUTTYPE unset; $FSLDIR/bin goes first on PATH
    env = fsl_env(os.environ)
    # one registration per slot: keep OpenMP/BLAS builds from oversubscribing the cores
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env.setdefault(var, "1")
    env["TBSS_QUEUE_BATCH"] = batch_id
    env["TBSS_QUEUE_TASK"] = task_id
    return env


def _until_redis_answers(fn: Callable[[], T], patience: float) -> T:
    """Call fn, retrying through a Redis restart for up to `patience` seconds."""
    deadline = time.monotonic() + patience
    while True:
        try:
            return fn()
        except (redis.ConnectionError, redis.TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def _log_files(
    cwd: str, log_dir: str | None, name: str, batch_id: str, line: int | None
) -> tuple[str, str] | None:
    """fsl_sub's log names: <logdir>/<name>.o<job id>.<task> and .e<job id>.<task>."""
    if not log_dir:
        return None
    base = os.path.join(cwd, log_dir, name)
    suffix = f"{batch_id}.{line}" if line is not None else batch_id
    return f"{base}.o{suffix}", f"{base}.e{suffix}"


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _sigterm_stops_command() -> Iterator[None]:
    """SIGTERM (cancel's revoke, a time-limit kill, the cold shutdown after a worker's grace
    period) raises SystemExit while a command runs, so the runner's `finally` kills its process
    tree and the task is handed back."""
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _sigterm_deferred() -> Iterator[None]:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def execute(
    task: Task,
    settings: Settings,
    batch_id: str,
    argv: list[str],
    cwd: str,
    time_limit: float | None = None,
    retries: int = 0,
    done_if_exists: str | None = None,
    path_map: PathMap | None = None,
    policy: Policy | None = None,
    log_dir: str | None = None,
    job_name: str | None = None,
    line: int | None = None,
) -> dict[str, Any]:
    """Run one command of a batch exactly once, as far as the bookkeeping can tell."""
    if path_map:
        argv, cwd = path_map.argv(argv), path_map.apply(cwd)
    argv = [local_fsl_tool(argv[0], os.environ), *argv[1:]]
    store = BatchStore(connect(settings, check=False))
    task_id = task.request.id
    node = task.request.hostname or "unknown"
    token = uuid.uuid4().hex
    patience = 10 * settings.lost_after
    claim = _until_redis_answers(
        lambda: store.claim(batch_id, task_id, node, token, settings.lost_after, os.getpid()),
        patience,
    )
    if claim != "ok":
        raise Ignore()  # finished, cancelled, or running elsewhere: a redelivery

    def record_end(state: str, record: dict[str, Any]) -> str:
        return _until_redis_answers(
            lambda: store.finish(batch_id, task_id, node, token, state, record), patience
        )

    env = command_env(batch_id, task_id)
    refused = policy.check(argv, cwd, env) if policy is not None else None
    if refused is not None:
        now = time.time()
        record_end(
            FAILED,
            {
                "cause": CAUSE_REFUSED,
                "message": f"refused: {refused}",
                "exit_code": None,
                "node": node,
                "started": now,
                "ended": now,
                "duration": 0.0,
                "stdout_tail": "",
                "stderr_tail": refused,
                "argv": argv,
            },
        )
        raise CommandFailed(f"refused: {refused}")
    marker = done_marker(argv, cwd, done_if_exists)
    if marker is not None and marker.done():
        record_end(
            SKIPPED,
            {"node": node, "message": f"already done: {marker.describe()}", "duration": 0.0},
        )
        raise Ignore()
    if marker is not None:
        remove_stale(argv, cwd)

    def hand_back() -> str:
        """Give our claim up: the task goes back to queued (unless cancelled meanwhile)."""
        return store.requeue(
            batch_id,
            task_id,
            token,
            limit=settings.crash_limit,
            count_loss=False,
            ignore_heartbeat=True,
        )

    def beat(_pid: int) -> None:
        try:
            store.heartbeat(batch_id, task_id, token, settings.lost_after)
        except (redis.ConnectionError, redis.TimeoutError):
            log.warning("heartbeat of task %s failed: broker unreachable", task_id)

    try:
        with _sigterm_stops_command():
            result = runner.run_command(
                argv,
                cwd,
                env=env,
                timeout=time_limit if time_limit else settings.time_limit,
                on_tick=beat,
                tick=settings.heartbeat,
                log_files=_log_files(cwd, log_dir, job_name or "tbss-queue", batch_id, line),
            )
    except BaseException:
        # stopped from outside (shutdown, cancel, lost broker): the runner already killed the
        # command's tree. Hand the task back unless it was cancelled, and queue it again in
        # case Celery acknowledges the message (a duplicate is dropped by the claim).
        with contextlib.suppress(Exception):
            if hand_back() == "requeued":
                republish(task.app, store, settings, batch_id, task_id)
        raise
    if result.ok and marker is not None and not marker.done():
        # fsl_reg exits 0 even when flirt or fnirt failed: only its outputs tell
        result = replace(
            result,
            cause=CAUSE_MISSING_OUTPUT,
            message=(
                f"exit code 0 but {marker.describe()} is missing or empty"
                + runner.last_line(result.stderr_tail)
            ),
        )
    record = {
        **result.to_dict(),
        "node": node,
        # the pool process's number; 0 outside a prefork pool (solo, threads)
        "slot": getattr(current_process(), "index", 0),
        "argv": argv,
        "attempt": task.request.retries + 1,
    }
    if result.ok:
        record_end(SUCCEEDED, record)
        return {"exit_code": result.exit_code, "duration": round(result.duration, 3), "node": node}
    if task.request.retries < retries and result.cause != runner.CAUSE_NO_CWD:
        hand_back()
        store.save_result(batch_id, task_id, record)
        raise task.retry(
            countdown=RETRY_DELAY, max_retries=retries, exc=CommandFailed(result.message)
        )
    record_end(FAILED, record)
    raise CommandFailed(result.message)


def register(
    app: Celery, settings: Settings, path_map: PathMap | None = None, policy: Policy | None = None
) -> None:
    """Attach the task to `app`, closing over the settings the worker was started with."""

    @app.task(name=TASK_NAME, bind=True, throws=(CommandFailed,))
    def run_command(
        self: Task, batch_id: str, argv: list[str], cwd: str, **options: Any
    ) -> dict[str, Any]:
        # options: the per-batch ones publish.task_kwargs sends (time_limit, retries, ...)
        return execute(
            self, settings, batch_id, argv, cwd, path_map=path_map, policy=policy, **options
        )
