"""Turning commands into Celery task messages without sending them yet.

Celery builds the messages (apply_async: protocol, headers, routing); only kombu's last step,
the Redis LPUSH in `Channel._put`, is captured, so that `batches.BatchStore.commit` can publish
a whole batch atomically: either every command is queued or none is.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shlex
from collections.abc import Sequence
from typing import Any

from celery import Celery
from kombu import serialization
from kombu.utils.json import dumps

from tbss_queue.fsl.outputs import parse_fsl_reg
from tbss_queue.queue.app import TASK_NAME
from tbss_queue.queue.keys import TaskSpec


def new_message_id() -> str:
    """A fresh id for one message (Celery's task id) or one delivery (kombu's tag)."""
    return secrets.token_hex(8)


LABEL_LENGTH = 60


def label(argv: Sequence[str]) -> str:
    """A short name for a command, shown by Flower and the worker's log as the task's name:
    the pair for fsl_reg (`sub05_FA→sub01_FA`), else the command, cut."""
    reg = parse_fsl_reg(argv)
    if reg is not None:
        return f"{os.path.basename(reg.input)}→{os.path.basename(reg.reference)}"
    text = shlex.join(argv)
    return text if len(text) <= LABEL_LENGTH else text[: LABEL_LENGTH - 1] + "…"


STUDY_SUBDIRS = ("FA", "origdata", "stats")
"""TBSS's own folders: a command run in one belongs to the study holding it."""


def study_name(cwd: str) -> str:
    """The study a command belongs to, as a person calls it: `/data/study5/FA` -> `study5`."""
    path = cwd.rstrip("/") or "/"
    base = os.path.basename(path)
    if base in STUDY_SUBDIRS:
        return os.path.basename(os.path.dirname(path)) or base
    return base or path


def shadow_name(batch_id: str, cwd: str, argv: Sequence[str]) -> str:
    """The task's name in Flower: its label with its batch and study, so that the same pair of
    five studies (`sub01_FA→sub02_FA`) are told apart."""
    return f"{label(argv)} · batch {batch_id} · {study_name(cwd)}"


REF_HEADER = "tbssq"
"""Message header holding "batch|command id": recovery finds a message's command without
decoding (or verifying) its body."""


def task_args(batch_id: str, t: TaskSpec, cwd: str) -> list[Any]:
    """The task's positional arguments: batch, command id, argv, working directory."""
    return [batch_id, t.task_id, list(t.argv), cwd]


START_BUDGET = 300
"""Seconds an attempt may take from its delivery to the command's spawn (the claim, the checks,
a Redis that answers BUSY or not at all): past it, the runner hands the command back unstarted
rather than start what Celery's hard limit might cut short."""

RECORD_BUDGET = 600
"""Seconds a runner waits out Redis trouble to record an attempt's outcome."""

HARD_LIMIT_MARGIN = START_BUDGET + RECORD_BUDGET + 60
"""Seconds Celery's own hard time limit, counted from the delivery, lies beyond a batch's time
limit, counted from the spawn: only a backstop for a hung runner. A healthy attempt never
reaches it, however long Redis made it wait: it starts within START_BUDGET, is stopped at its
own limit, and records within RECORD_BUDGET."""


def task_kwargs(meta: dict[str, Any]) -> dict[str, Any]:
    """The per-batch options every task message of a batch carries (only those that are set)."""
    keys = (
        "time_limit", "retries", "done_if_exists", "log_dir", "job_name", "job_id", "job_tasks",
        "mem", "threads",
    )  # fmt: skip
    return {k: meta[k] for k in keys if meta.get(k)}


def with_line(kwargs: dict[str, Any], line: int) -> dict[str, Any]:
    """Per-task kwargs: the line number, where logs are named after it (fsl_sub's -l) or it is
    an fsl_sub array task's id; a single fsl_sub job has none (its logs: <name>.o<id>)."""
    if kwargs.get("job_id"):
        return {**kwargs, "line": line} if kwargs.get("job_tasks") else kwargs
    return {**kwargs, "line": line} if kwargs.get("log_dir") else kwargs


def send_options(settings_time_limit: float, meta: dict[str, Any]) -> dict[str, Any]:
    """Celery options of a batch's messages: its hard time limit, as a backstop."""
    limit = meta.get("time_limit") or settings_time_limit
    return {"time_limit": float(limit) + HARD_LIMIT_MARGIN}


def celery_messages(
    app: Celery,
    batch_id: str,
    cwd: str,
    tasks: Sequence[TaskSpec],
    kwargs: dict[str, Any],
    options: dict[str, Any],
) -> list[tuple[str, str]]:
    """Celery's messages for `tasks`, as (redis list, payload) pairs, none of them sent:
    `send_task` all the way down to kombu's Redis LPUSH, which is captured instead."""
    captured: list[tuple[str, str]] = []
    with app.connection_for_write() as conn:
        channel = conn.default_channel

        def capture(queue: str, message: dict[str, Any], **_: Any) -> None:
            _compact(message)
            pri = channel._get_message_priority(message, reverse=False)
            captured.append((channel._q_for_pri(queue, pri), dumps(message)))

        channel._put = capture
        producer = app.amqp.Producer(channel, auto_declare=False)
        try:
            for t in tasks:
                task_kw = with_line(kwargs, t.line)
                app.send_task(
                    TASK_NAME,
                    args=task_args(batch_id, t, cwd),
                    kwargs=task_kw,
                    task_id=new_message_id(),
                    headers={REF_HEADER: f"{batch_id}|{t.task_id}"},
                    producer=producer,
                    # Flower and the worker's log show this as the task's name
                    shadow=shadow_name(batch_id, cwd, t.argv),
                    # nothing is sent here (see capture): kombu's reconnect wrapper only costs
                    retry=False,
                    ignore_result=True,
                    **options,
                )
        finally:
            producer.release()
    return captured


def build_messages(
    app: Celery,
    batch_id: str,
    cwd: str,
    tasks: Sequence[TaskSpec],
    kwargs: dict[str, Any],
    options: dict[str, Any],
) -> list[tuple[str, str]]:
    """The same messages as `celery_messages`, at a tenth of the cost for large batches.

    Celery makes the first message; the others differ from it only in the message id, the
    command (body, shadow name, tbssq header) and kombu's delivery tag, so they are that message
    with those fields replaced. The body is serialized (and signed, with the auth serializer) by
    kombu's own serializer registry. tests/test_publish.py checks both paths agree.
    """
    if not tasks:
        return []
    queue, first = celery_messages(app, batch_id, cwd, tasks[:1], kwargs, options)[0]
    template = json.loads(first)
    headers, properties = template["headers"], template["properties"]
    serializer = app.conf.task_serializer
    messages = [(queue, first)]
    for t in tasks[1:]:
        body: tuple[Any, ...] = (task_args(batch_id, t, cwd), with_line(kwargs, t.line), {})
        attempt = new_message_id()
        message = {
            **template,
            "body": _body(body, serializer, properties.get("body_encoding")),
            "headers": {
                **headers,
                "id": attempt,
                "shadow": shadow_name(batch_id, cwd, t.argv),
                REF_HEADER: f"{batch_id}|{t.task_id}",
            },
            "properties": {**properties, "delivery_tag": new_message_id()},
        }
        messages.append((queue, dumps(message)))
    return messages


def _body(body: Any, serializer: str, encoding: str | None) -> str:
    """A task's body as it is stored: plain JSON text (kombu reads a body without an encoding
    as is), or base64 where the serializer's output is not text (signed messages)."""
    if encoding is None:
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False)
    _, _, data = serialization.dumps(body, serializer=serializer)
    raw = data if isinstance(data, bytes) else data.encode("utf-8")
    return base64.b64encode(raw).decode("ascii")


_OPTIONAL_DEFAULTS: dict[str, Any] = {
    "eta": None,
    "expires": None,
    "group": None,
    "group_index": None,
    "parent_id": None,
    "retries": 0,
    "stamped_headers": None,
    "stamps": {},
    "replaced_task_nesting": 0,
}
"""Headers that protocol 2 marks optional (or that only canvas and stamping use), at the values
a worker assumes when they are absent."""

_UNUSED_HEADERS = ("root_id", "origin", "argsrepr", "kwargsrepr", "ignore_result")
"""Read by the worker with a default (a workflow's root, the sender's host name, the
arguments as Flower shows them: the shadow name says which command it is) or set app-wide
(task_ignore_result)."""

_UNUSED_PROPERTIES = ("reply_to", "correlation_id", "argsrepr", "kwargsrepr")
"""Where a result would be sent and matched: results are ignored (the batch records hold the
outcomes); Celery's copies of the reprs."""


def _compact(message: dict[str, Any]) -> None:
    """Celery's message less what a worker never reads, with a plain-text body: about 500
    bytes of Redis less per queued command (docs/benchmarks.md), read exactly as before."""
    headers, properties = message["headers"], message["properties"]
    for name, default in _OPTIONAL_DEFAULTS.items():
        if name in headers and headers[name] == default:
            del headers[name]
    for name in _UNUSED_HEADERS:
        headers.pop(name, None)
    for name in _UNUSED_PROPERTIES:
        properties.pop(name, None)
    properties["delivery_tag"] = new_message_id()
    if message.get("content-type") == "application/json":
        body = message["body"]
        if properties.pop("body_encoding", None) == "base64":
            body = base64.b64decode(body)
        args, kwargs, _ = json.loads(body)
        message["body"] = _body((args, kwargs, {}), "json", None)
