"""A tbss-queue batch as fsl_sub's job structure, which `fsl_sub_report` and fsl_sub.report read."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from fsl_sub import consts

from tbss_queue.fsl.jobs import Job
from tbss_queue.models import TaskRecord

STATES = {
    "queued": consts.QUEUED,
    "running": consts.RUNNING,
    "succeeded": consts.FINISHED,
    "skipped": consts.FINISHED,  # its outputs were there already: nothing left to do
    "failed": consts.FAILED,
    "cancelled": consts.FAILED,  # as fsl_sub's Slurm back end reports a cancelled task
}


def _when(seconds: float | None) -> dt.datetime | None:
    return None if seconds is None else dt.datetime.fromtimestamp(seconds)


def _task(job: Job, record: TaskRecord | None) -> dict[str, Any]:
    submitted = _when(job.submitted)
    if record is None:  # held: nothing of it is queued yet
        status, start, end, code, message = consts.HELD, None, None, None, None
    else:
        status, code = STATES.get(record.state, consts.QUEUED), record.exit_code
        start, end, message = _when(record.started), _when(record.ended), record.message or None
    return {
        "status": status,
        "start_time": start,
        "end_time": end,
        "sub_time": submitted,
        "utime": None,
        "stime": None,
        "exit_status": code,
        # fsl_sub.report documents error_message; fsl_sub_report prints error_messages
        "error_message": message,
        "error_messages": message,
        "maxmemory": None,
    }


def job_details(
    job: Job, records: Sequence[TaskRecord], held: bool, sub_job_id: int | None = None
) -> dict[str, Any]:
    """fsl_sub's job dictionary: tasks keyed by task id (the line of the task file; 1 for a
    single command), each with an fsl_sub.consts state: a failed or cancelled task is FAILED."""
    if held:
        tasks = {i: _task(job, None) for i in range(1, (job.tasks or 1) + 1)}
    else:
        tasks = {r.line: _task(job, r) for r in records}
    if sub_job_id is not None:
        tasks = {k: v for k, v in tasks.items() if k == sub_job_id}
    return {
        "id": job.id,
        "name": job.name,
        "script": job.script,
        "arguments": None,
        "submission_time": _when(job.submitted),
        "tasks": tasks,
        "parents": list(job.holds) or None,
        "children": None,
        "job_directory": job.cwd,
    }
