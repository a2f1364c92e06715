"""The fast message builder produces exactly the messages Celery's send_task produces."""

from __future__ import annotations

import json

from tbss_queue.app import make_app
from tbss_queue.batches import TaskSpec
from tbss_queue.config import Settings
from tbss_queue.publish import build_messages, celery_messages, send_options, task_id_for


def _without_delivery_tag(payload: str) -> dict:
    """The message less what is fresh in every message: its delivery tag and its own id."""
    message = json.loads(payload)
    assert message["properties"].pop("delivery_tag")
    ids = {message["headers"].pop(k) for k in ("id", "root_id")}
    ids.add(message["properties"].pop("correlation_id"))
    assert len(ids) == 1
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
    # optional headers at their defaults are left out (Redis memory), the required ones kept
    message = json.loads(fast[0][1])
    assert not {"shadow", "eta", "expires", "retries", "stamps"} & message["headers"].keys()
    assert "reply_to" not in message["properties"]
    assert {"lang", "task", "id", "root_id", "parent_id", "group"} <= message["headers"].keys()
    assert build_messages(app, "b1", "/", [], {}, {}) == []
