"""The fast message builder produces exactly the messages Celery's send_task produces."""

from __future__ import annotations

import json

from tbss_queue.config import Settings
from tbss_queue.queue.app import make_app
from tbss_queue.queue.keys import TaskSpec, task_id_for
from tbss_queue.queue.publish import build_messages, celery_messages, send_options


def _without_delivery_tag(payload: str) -> dict:
    """The message less what is fresh in every message: its delivery tag and its own id."""
    message = json.loads(payload)
    assert message["properties"].pop("delivery_tag")
    assert message["headers"].pop("id")
    return message


def test_fast_messages_equal_celerys_own(settings: Settings) -> None:
    app = make_app(settings)
    argvs = [("fsl_reg", f"FA/s{i}", "FA/t", f"s{i}_to_t", "-e", "-FA") for i in range(5)]
    argvs.append(("echo", "ünïcode", "it's", "a b"))
    tasks = [
        TaskSpec(task_id_for("b1", str(i)), i + 1, argv, str(i)) for i, argv in enumerate(argvs)
    ]
    for kwargs in ({}, {"time_limit": 60.0, "retries": 2, "log_dir": "logs", "job_name": "j"}):
        options = send_options(settings.time_limit, kwargs)
        fast = build_messages(app, "b1", "/study/FA", tasks, kwargs, options)
        slow = celery_messages(app, "b1", "/study/FA", tasks, kwargs, options)
        assert [q for q, _ in fast] == [q for q, _ in slow] == ["tbss-queue"] * len(tasks)
        assert [_without_delivery_tag(m) for _, m in fast] == [
            _without_delivery_tag(m) for _, m in slow
        ]
        # every message has its own delivery tag (kombu keys unacked messages by it) and its own
        # id (an attempt's), never the command's; the command's id travels in args and header
        assert len({json.loads(m)["properties"]["delivery_tag"] for _, m in fast}) == len(tasks)
        ids = {json.loads(m)["headers"]["id"] for _, m in fast + slow}
        assert len(ids) == 2 * len(tasks) and not ids & {t.task_id for t in tasks}
        assert [json.loads(m)["headers"]["tbssq"] for _, m in fast] == [
            f"b1|{t.task_id}" for t in tasks
        ]
    # what a worker never reads is left out (Redis memory), the required headers kept; the body
    # is plain JSON text; the shadow name is the command's label (fsl_reg: the pair) with its
    # batch and study (the folder above FA/), which Flower shows as the task's name
    message = json.loads(fast[0][1])
    unread = {"eta", "expires", "retries", "stamps", "root_id", "parent_id", "group", "origin"}
    assert not unread & message["headers"].keys()
    assert not {"argsrepr", "kwargsrepr", "ignore_result"} & message["headers"].keys()
    assert not {"reply_to", "correlation_id", "body_encoding"} & message["properties"].keys()
    assert {"lang", "task", "id", "timelimit"} <= message["headers"].keys()
    assert message["headers"]["shadow"] == "s0→t · batch b1 · study"
    assert json.loads(message["body"])[0][:2] == ["b1", tasks[0].task_id]
    assert build_messages(app, "b1", "/", [], {}, {}) == []
