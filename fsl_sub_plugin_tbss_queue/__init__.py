"""fsl_sub back end that submits to tbss-queue, so FSL's own scripts use it unchanged.

With `method: tbss_queue` in the YAML file FSLSUB_CONF names, `tbss_2_reg`'s
`fsl_sub -l tbss_logs -T 60 -N tbss_2_reg -t .commands` becomes one tbss-queue batch and fsl_sub
prints an integer job id, a new one for every submission (as Slurm and the shell back end do),
which `fsl_sub_report ID`, `fsl_sub --delete_job ID` and `-j ID` take. A single command becomes
a one-task batch. Tasks run in the directory fsl_sub was called from; logs go to -l, else to that
directory, named as fsl_sub names them (<name>.o<id>.<task> for a task file, <name>.o<id> for a
single command). -T is a hint, as in fsl_sub's Slurm back end, unless `set_time_limit: true` in
method_opts.tbss_queue makes it the limit. What tbss-queue cannot honour is refused, never
ignored: see `unsupported`. The broker comes from TBSS_QUEUE_BROKER, or `broker:` under
method_opts.tbss_queue.
"""

from __future__ import annotations

import os
import shlex
import shutil
from importlib.resources import files
from pathlib import Path
from typing import Any

from tbss_queue import api
from tbss_queue.config import Settings
from tbss_queue.errors import TbssQueueError
from tbss_queue.fsl.jobs import Job, hold_batches, load_job, new_job_id, save_job
from tbss_queue.queue.batches import BatchStore
from tbss_queue.queue.broker import connect
from tbss_queue.views import requests as node_requests

from .options import coprocessor_asked, requests, unsupported

VERSION = "1.1.0"
JOBS_DIR = ".tbss-queue-jobs"
"""Where, in fsl_sub's working directory, each job's commands are kept (tbss_2_reg rewrites
.commands on its next run; the job keeps what it was submitted with)."""


def plugin_factory() -> TbssQueuePlugin:
    return TbssQueuePlugin()


def _method_opts() -> dict[str, Any]:
    try:
        from fsl_sub.config import method_config

        return dict(method_config("tbss_queue") or {})
    except Exception:  # fsl_sub missing or not configured for us: environment only
        return {}


def _holds(jobhold: Any) -> list[str]:
    if not jobhold:
        return []
    items = jobhold if isinstance(jobhold, (list, tuple)) else str(jobhold).split(",")
    return [str(i).strip() for i in items if str(i).strip()]


def _job_id(job_id: Any) -> int | None:
    """An id as fsl_sub's tools give it (int, '12' or '12.3'); None if it is no number."""
    text = str(job_id).split(".", 1)[0].strip()
    return int(text) if text.isdecimal() else None


def _affirmative(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "y", "yes", "true", "on")


def time_limit(jobtime: Any, opts: dict[str, Any], env: dict[str, str]) -> float | None:
    """-T in seconds when it is to be enforced, else None (the queue's default limit applies).

    fsl_sub's -T is the expected run time, used to pick a queue; its Slurm back end makes it
    the job's limit only with `set_time_limit: True`, and FSLSUB_NOTIMELIMIT=1 overrides
    that. tbss_2_reg asks -T 60: a slow registration must not be killed at one hour."""
    if not jobtime or not opts.get("set_time_limit") or _affirmative(env.get("FSLSUB_NOTIMELIMIT")):
        return None
    return float(jobtime) * 60


class TbssQueuePlugin:
    """The object fsl_sub's plugin loader expects (see fsl_sub's shell plugin)."""

    def plugin_version(self) -> str:
        return VERSION

    def qtest(self) -> bool:
        return True

    def queue_exists(self, qname: str, qtest: Any = None) -> bool:
        return True

    def already_queued(self) -> bool:
        """Inside a tbss-queue task: fsl_sub then runs the command here (shell method)."""
        return "TBSS_QUEUE_TASK" in os.environ

    def build_queue_defs(self) -> str:
        return ""

    def provides_coproc_config(self) -> bool:
        return False

    def default_conf(self) -> str:
        return files(__name__).joinpath("fsl_sub_tbss_queue.yml").read_text()

    def _settings(self) -> Settings:
        broker = _method_opts().get("broker")
        return Settings.resolve(broker=broker or None)

    def _job(self, job_id: Any) -> tuple[Settings, Job | None]:
        settings = self._settings()
        number = _job_id(job_id)
        return settings, (None if number is None else load_job(connect(settings), number))

    def qdel(self, job_id: Any) -> tuple[str, int]:
        """Cancel a job's batch: queued tasks dropped, running ones killed. (message, exit code)"""
        try:
            settings, job = self._job(job_id)
            if job is None:
                return (f"Unrecognised job id {job_id}", 1)
            status = api.cancel(job.batch, settings=settings)
        except TbssQueueError as exc:
            return (f"Job {job_id} not deleted: {exc}", 1)
        return (
            f"Job {job_id} (tbss-queue batch {job.batch}) deleted: "
            f"{status.cancelled} tasks cancelled",
            0,
        )

    def job_status(self, job_id: Any, sub_job_id: Any = None) -> dict[str, Any] | None:
        """fsl_sub's job structure (see fsl_sub.report): None for an id no submission had,
        which fsl_sub_report reports as an unrecognised job id."""
        from fsl_sub.exceptions import BadConfiguration

        from .report import job_details

        try:
            settings, job = self._job(job_id)
            if job is None:
                return None
            held = job.batch in BatchStore(connect(settings)).held()
            records = [] if held else api.tasks(job.batch, settings=settings)
        except TbssQueueError as exc:
            raise BadConfiguration(str(exc)) from None
        return job_details(job, records, held, _job_id(sub_job_id) if sub_job_id else None)

    def submit(
        self,
        command: list[str],
        job_name: str,
        jobhold: Any = None,
        array_task: bool = False,
        array_hold: Any = None,
        logdir: str | None = None,
        jobtime: Any = None,
        **options: Any,
    ) -> int:
        """Submit one job; returns the job id fsl_sub prints."""
        from fsl_sub.exceptions import BadSubmission

        if not command:
            raise BadSubmission("Must provide command line or array task file name")
        refusal = unsupported(
            command, array_task, {**options, "coprocessor": coprocessor_asked(options)}
        )
        if refusal:
            raise BadSubmission(refusal)
        settings = self._settings()
        mem, threads = requests(options)
        cwd = os.getcwd()
        try:
            r = connect(settings)
            # before a job id or a file is made: a refused job leaves nothing behind
            facts = BatchStore(r).all_node_facts()
            refused = node_requests.refusal(mem, threads, facts, ("-R", "-s"))
            if refused:
                raise BadSubmission(refused)
            job_id = new_job_id(r)
            jobs = Path(cwd, JOBS_DIR)
            jobs.mkdir(exist_ok=True)
            script = jobs / f"{job_name.replace('/', '_')}.{job_id}.commands"
            if array_task:
                shutil.copyfile(command[0], script)
                tasks: int | None = len(script.read_text().splitlines())
            else:
                # fsl_sub leaves a line with ';' unsplit: as written, the commands file then
                # refuses its shell syntax (tasks run without a shell)
                unsplit = len(command) == 1 and ";" in command[0]
                line = command[0] if unsplit else shlex.join(command)
                script.write_text(line + "\n")
                tasks = None
            holds = hold_batches(r, _holds(jobhold) + _holds(array_hold))
            batch = api.submit(
                script,
                cwd=cwd,
                time_limit=time_limit(jobtime, _method_opts(), dict(os.environ)),
                after=holds,
                log_dir=os.path.abspath(logdir or cwd),
                job_name=job_name,
                job_id=job_id,
                job_tasks=tasks,
                mem=mem,
                threads=threads,
                settings=settings,
                request_names=("-R", "-s"),
            )
        except (TbssQueueError, OSError) as exc:
            raise BadSubmission(str(exc)) from None
        save_job(
            r,
            Job(job_id, batch.id, job_name, tasks, cwd, str(script), batch.submitted, tuple(holds)),
        )
        return job_id
