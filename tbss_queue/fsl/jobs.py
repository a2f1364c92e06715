"""fsl_sub jobs on tbss-queue: integer job ids, and what an fsl_sub task finds in its environment.

fsl_sub's tools parse job ids as integers (`fsl_sub_report ID`, `fsl_sub --delete_job ID`), and
Slurm and fsl_sub's shell back end give every submission a new one. So each submission through
the plugin gets the next number of one Redis counter and becomes a batch of its own; the id ->
batch mapping lives beside the batches.

Keys (global, not per batch; retention must cover them):
  tbssq:jobid         STRING  the last job id handed out (INCR)
  tbssq:job:ID        HASH    batch, name, tasks, cwd, script, submitted, holds
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

JOB_COUNTER = "tbssq:jobid"


def job_key(job_id: int) -> str:
    return f"tbssq:job:{job_id}"


@dataclass(frozen=True)
class Job:
    """One fsl_sub submission: its id, its batch and what fsl_sub_report shows of it."""

    id: int
    batch: str
    name: str
    tasks: int | None  # lines of an array job; None for a single command
    cwd: str
    script: str  # the commands file the batch was made from (a copy: tbss_2_reg rewrites its own)
    submitted: float
    holds: tuple[str, ...] = ()


def new_job_id(r: Any) -> int:
    """The next job id (1, 2, ...): unique across every submitter of this broker."""
    return int(r.incr(JOB_COUNTER))


def save_job(r: Any, job: Job) -> None:
    r.hset(
        job_key(job.id),
        mapping={
            "batch": job.batch,
            "name": job.name,
            "tasks": "" if job.tasks is None else str(job.tasks),
            "cwd": job.cwd,
            "script": job.script,
            "submitted": repr(job.submitted),
            "holds": json.dumps(list(job.holds)),
        },
    )


def load_job(r: Any, job_id: int) -> Job | None:
    """The job with this id, or None when no submission had it (or it expired)."""
    raw = r.hgetall(job_key(job_id))
    if not raw:
        return None
    return Job(
        job_id,
        raw["batch"],
        raw["name"],
        int(raw["tasks"]) if raw.get("tasks") else None,
        raw["cwd"],
        raw["script"],
        float(raw["submitted"]),
        tuple(json.loads(raw.get("holds") or "[]")),
    )


def hold_batches(r: Any, holds: Sequence[str]) -> list[str]:
    """fsl_sub's -j ids as batch ids: a number that is a job id means its batch; anything else
    is taken as a tbss-queue batch id (submit reports one it does not know)."""
    out = []
    for hold in holds:
        job = load_job(r, int(hold)) if hold.isdecimal() else None
        out.append(job.batch if job is not None else hold)
    return out


JOB_ID_VAR = "TBSSQ_JOB_ID"
TASK_ID_VAR = "TBSSQ_ARRAY_TASK_ID"
NSLOTS_VAR = "TBSSQ_NSLOTS"


def fsl_sub_env(job_id: int, line: int | None, tasks: int | None) -> dict[str, str]:
    """The variables fsl_sub's back ends set for a task: FSLSUB_*_VAR name the variables that
    hold the job id, the array task id (= line number) and its range, and the slots (always
    one here). Programs and a nested fsl_sub (which runs in the shell back end inside a task)
    read them."""
    env = {
        JOB_ID_VAR: str(job_id),
        NSLOTS_VAR: "1",
        "FSLSUB_JOBID_VAR": JOB_ID_VAR,
        "FSLSUB_JOB_ID_VAR": JOB_ID_VAR,  # the Slurm back end's spelling
        "FSLSUB_NSLOTS": NSLOTS_VAR,
        "FSLSUB_PARALLEL": "1",
    }
    if tasks is not None and line is not None:
        env.update(
            {
                TASK_ID_VAR: str(line),
                "TBSSQ_ARRAY_TASK_FIRST": "1",
                "TBSSQ_ARRAY_TASK_LAST": str(tasks),
                "TBSSQ_ARRAY_TASK_STEP": "1",
                "TBSSQ_ARRAY_TASK_COUNT": str(tasks),
                "FSLSUB_ARRAYTASKID_VAR": TASK_ID_VAR,
                "FSLSUB_ARRAYSTARTID_VAR": "TBSSQ_ARRAY_TASK_FIRST",
                "FSLSUB_ARRAYENDID_VAR": "TBSSQ_ARRAY_TASK_LAST",
                "FSLSUB_ARRAYSTEPSIZE_VAR": "TBSSQ_ARRAY_TASK_STEP",
                "FSLSUB_ARRAYCOUNT_VAR": "TBSSQ_ARRAY_TASK_COUNT",
            }
        )
    return env


_ARRAY_VARS = (
    "FSLSUB_ARRAYTASKID_VAR",
    "FSLSUB_ARRAYSTARTID_VAR",
    "FSLSUB_ARRAYENDID_VAR",
    "FSLSUB_ARRAYSTEPSIZE_VAR",
    "FSLSUB_ARRAYCOUNT_VAR",
)


def with_fsl_sub_env(
    env: Mapping[str, str], job_id: int | None, line: int | None, tasks: int | None
) -> dict[str, str]:
    """`env` for a task of fsl_sub job `job_id` (unchanged for other commands); a single job
    loses any array variable the worker itself inherited, as in fsl_sub's shell back end."""
    out = dict(env)
    if job_id is None:
        return out
    for name in _ARRAY_VARS:
        out.pop(name, None)
    out.update(fsl_sub_env(job_id, line, tasks))
    return out
