"""The one Celery task: claim the command, run it, record the outcome. Thin by design."""

from __future__ import annotations

import os
import uuid
from typing import Any

from billiard.process import current_process
from celery import Celery, Task
from celery.exceptions import Ignore

from . import runner
from .app import TASK_NAME
from .batches import FAILED, SKIPPED, SUCCEEDED, BatchStore
from .broker import connect
from .config import Settings
from .fsl import parse_fsl_reg, reg_done, remove_stale

CAUSE_MISSING_OUTPUT = "missing output"


class CommandFailed(Exception):
    """Raised (into Celery, so Flower shows FAILURE) when a command did not succeed."""


def command_env(batch_id: str, task_id: str) -> dict[str, str]:
    """The environment a command runs in: the worker's, plus what FSL tools need."""
    env = dict(os.environ)
    # FSL images are written as .nii.gz unless the site says otherwise; FSL refuses to run unset
    env.setdefault("FSLOUTPUTTYPE", "NIFTI_GZ")
    # one registration per slot: keep OpenMP/BLAS builds from oversubscribing the cores
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env.setdefault(var, "1")
    env["TBSS_QUEUE_BATCH"] = batch_id
    env["TBSS_QUEUE_TASK"] = task_id
    return env


def execute(
    task: Task,
    settings: Settings,
    batch_id: str,
    argv: list[str],
    cwd: str,
    time_limit: float | None = None,
) -> dict[str, Any]:
    """Run one command of a batch exactly once, as far as the bookkeeping can tell."""
    store = BatchStore(connect(settings, check=False))
    task_id = task.request.id
    node = task.request.hostname or "unknown"
    token = uuid.uuid4().hex
    claim = store.claim(batch_id, task_id, node, token, settings.lost_after, os.getpid())
    if claim != "ok":
        # finished, cancelled, or running elsewhere: a redelivery, nothing to do
        raise Ignore()

    reg = parse_fsl_reg(argv)
    if reg is not None:
        if reg_done(reg, cwd):
            record = {"node": node, "message": "outputs already exist", "duration": 0.0}
            store.finish(batch_id, task_id, node, token, SKIPPED, record)
            raise Ignore()
        remove_stale(reg, cwd)

    def beat(_pid: int) -> None:
        store.heartbeat(batch_id, task_id, token, settings.lost_after)

    result = runner.run_command(
        argv,
        cwd,
        env=command_env(batch_id, task_id),
        timeout=time_limit if time_limit else settings.time_limit,
        on_tick=beat,
        tick=settings.heartbeat,
    )
    record = {**result.to_dict(), "node": node, "slot": current_process().index, "argv": argv}
    state = SUCCEEDED if result.ok else FAILED
    store.finish(batch_id, task_id, node, token, state, record)
    if not result.ok:
        raise CommandFailed(result.message)
    return {"exit_code": result.exit_code, "duration": round(result.duration, 3), "node": node}


def register(app: Celery, settings: Settings) -> None:
    """Attach the task to `app`, closing over the settings the worker was started with."""

    @app.task(name=TASK_NAME, bind=True, throws=(CommandFailed,))
    def run_command(
        self: Task, batch_id: str, argv: list[str], cwd: str, time_limit: float | None = None
    ) -> dict[str, Any]:
        return execute(self, settings, batch_id, argv, cwd, time_limit)
