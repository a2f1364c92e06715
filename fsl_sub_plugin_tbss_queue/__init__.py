"""fsl_sub back end that submits to tbss-queue, so FSL's own scripts use it unchanged.

With `method: tbss_queue` in the YAML file FSLSUB_CONF names, `tbss_2_reg`'s
`fsl_sub -l tbss_logs -T 60 -N tbss_2_reg -t .commands` becomes one tbss-queue batch (the job
id fsl_sub prints is the batch id); a single command becomes a one-task batch. Mapped: the job
name (-N), the log directory (-l: <name>.o<batch>.<line> / .e...), the time limit (-T, minutes)
and holds (-j: the batch waits until those batches have ended). The broker comes from
TBSS_QUEUE_BROKER, or `broker:` under method_opts.tbss_queue.
"""

from __future__ import annotations

import os
import shlex
import uuid
from importlib.resources import files
from typing import Any

from tbss_queue import api
from tbss_queue.config import Settings
from tbss_queue.errors import TbssQueueError

VERSION = "1.0.0"


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

    def qdel(self, job_id: str) -> tuple[str, int]:
        api.cancel(str(job_id), settings=self._settings())
        return (f"cancelled tbss-queue batch {job_id}", 0)

    def build_queue_defs(self) -> str:
        return ""

    def provides_coproc_config(self) -> bool:
        return False

    def default_conf(self) -> str:
        return files(__name__).joinpath("fsl_sub_tbss_queue.yml").read_text()

    def job_status(self, job_id: str, sub_job_id: Any = None) -> str:
        status = api.status(str(job_id), settings=self._settings())
        return "finished" if status.done else "running"

    def _settings(self) -> Settings:
        broker = _method_opts().get("broker")
        return Settings.resolve(broker=broker or None)

    def submit(
        self,
        command: list[str],
        job_name: str,
        threads: Any = None,
        queue: Any = None,
        jobhold: Any = None,
        array_task: bool = False,
        logdir: str | None = None,
        jobtime: Any = None,
        **_: Any,
    ) -> str:
        """Submit; returns the job id fsl_sub prints (the batch id)."""
        from fsl_sub.exceptions import BadSubmission

        if not command:
            raise BadSubmission("Must provide command line or array task file name")
        settings = self._settings()
        time_limit = float(jobtime) * 60 if jobtime else None
        try:
            if array_task:
                path = command[0]
                cwd = None  # the task file's directory: FA/ for tbss_2_reg
            else:
                jobs = os.path.join(logdir or os.getcwd(), ".tbss-queue-jobs")
                os.makedirs(jobs, exist_ok=True)
                path = os.path.join(jobs, f"{job_name}.{uuid.uuid4().hex[:8]}.commands")
                with open(path, "w") as fh:
                    fh.write(shlex.join(command) + "\n")
                cwd = os.getcwd()
            batch = api.submit(
                path,
                cwd=cwd,
                time_limit=time_limit,
                after=_holds(jobhold),
                log_dir=os.path.abspath(logdir) if logdir else None,
                job_name=job_name,
                settings=settings,
            )
        except TbssQueueError as exc:
            raise BadSubmission(str(exc)) from None
        return batch.id
