"""Turning commands into Celery task messages without sending them yet.

Celery builds the messages (apply_async: protocol, headers, routing); only kombu's last step,
the Redis LPUSH in `Channel._put`, is captured, so that `batches.BatchStore.commit` can publish
a whole batch atomically: either every command is queued or none is.
"""

from __future__ import annotations

import base64
import json
import shlex
import uuid
from collections.abc import Sequence
from typing import Any

from celery import Celery
from kombu import serialization
from kombu.utils.json import dumps

from .app import TASK_NAME
from .batches import TaskSpec

_NAMESPACE = uuid.UUID("6b7c1f1e-2f55-4d0c-9a43-3c1f3e0a7b42")


def task_id_for(batch_id: str, command_key: str) -> str:
    """A command's id derives from batch and command: it can't be queued twice in a batch.

    It names the command in the batch records. Each Celery message carries a fresh id of its
    own (one row per attempt in Flower, and no id a worker remembers as revoked is ever reused);
    the command's id travels in the message's arguments and in its `tbssq` header."""
    return str(uuid.uuid5(_NAMESPACE, f"{batch_id}|{command_key}"))


REF_HEADER = "tbssq"
"""Message header holding "batch|command id": recovery finds a message's command without
decoding (or verifying) its body."""


def task_args(batch_id: str, t: TaskSpec, cwd: str) -> list[Any]:
    """The task's positional arguments: batch, command id, argv, working directory."""
    return [batch_id, t.task_id, list(t.argv), cwd]


HARD_LIMIT_MARGIN = 60
"""Seconds Celery's own hard time limit lies beyond ours: a backstop if the runner hangs."""


def task_kwargs(meta: dict[str, Any]) -> dict[str, Any]:
    """The per-batch options every task message of a batch carries (only those that are set)."""
    keys = ("time_limit", "retries", "done_if_exists", "log_dir", "job_name", "job_id", "job_tasks")
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
            # Celery copies these into the properties too; the headers' copies are the ones read
            for duplicate in ("argsrepr", "kwargsrepr"):
                message["properties"].pop(duplicate, None)
            _drop_defaults(message)
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
                    task_id=str(uuid.uuid4()),
                    headers={REF_HEADER: f"{batch_id}|{t.task_id}"},
                    producer=producer,
                    # Flower shows this as the task's args: the command itself
                    argsrepr=shlex.join(t.argv),
                    kwargsrepr=repr(task_kw),
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
    command (body, argsrepr, kwargsrepr, tbssq header) and kombu's delivery tag, so they are
    that message with those fields replaced. The body is serialized (and signed, with the
    auth serializer) by kombu's own serializer registry. tests/test_publish.py checks both
    paths agree.
    """
    if not tasks:
        return []
    queue, first = celery_messages(app, batch_id, cwd, tasks[:1], kwargs, options)[0]
    template = json.loads(first)
    headers, properties = template["headers"], template["properties"]
    if properties.get("body_encoding") != "base64":  # pragma: no cover - kombu's Redis default
        return celery_messages(app, batch_id, cwd, tasks, kwargs, options)
    serializer = app.conf.task_serializer
    messages = [(queue, first)]
    for t in tasks[1:]:
        task_kw = with_line(kwargs, t.line)
        body = (task_args(batch_id, t, cwd), task_kw, _EMBED)
        attempt = str(uuid.uuid4())
        _, _, data = serialization.dumps(body, serializer=serializer)
        raw = data if isinstance(data, bytes) else data.encode("utf-8")
        message = {
            **template,
            "body": base64.b64encode(raw).decode("ascii"),
            "headers": {
                **headers,
                "id": attempt,
                "root_id": attempt,
                REF_HEADER: f"{batch_id}|{t.task_id}",
                "argsrepr": shlex.join(t.argv),
                "kwargsrepr": repr(task_kw),
            },
            "properties": {
                **properties,
                "correlation_id": attempt,
                "delivery_tag": str(uuid.uuid4()),
            },
        }
        messages.append((queue, dumps(message)))
    return messages


_OPTIONAL_DEFAULTS: dict[str, Any] = {
    "shadow": None,
    "eta": None,
    "expires": None,
    "group_index": None,
    "retries": 0,
    "stamped_headers": None,
    "stamps": {},
    "replaced_task_nesting": 0,
}
"""Headers that protocol 2 marks optional (or that only canvas and stamping use), at the values
a worker assumes when they are absent. Leaving them out saves 200 bytes of Redis per command."""


def _drop_defaults(message: dict[str, Any]) -> None:
    headers = message["headers"]
    for name, default in _OPTIONAL_DEFAULTS.items():
        if name in headers and headers[name] == default:
            del headers[name]
    # where a result would be sent; results are ignored (the batch records hold outcomes)
    message["properties"].pop("reply_to", None)


_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
"""Celery's protocol-2 body: (args, kwargs, embed); a plain task embeds no workflow."""
