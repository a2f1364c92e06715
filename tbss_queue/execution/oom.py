"""A command the kernel killed for want of memory: the node's fault, not the command's.

The runner calls it so (runner.CAUSE_OOM) when the command died of a SIGKILL none of ours sent
while the node's cgroup, or the machine, counted an OOM kill. It is handed back, not failed,
and this node admits less (its ledger raises what the command needs here); in the same Lua step
as the hand-back (release.lua) Redis counts the nodes that killed it so, and on the
TBSS_QUEUE_OOM_LIMIT-th it fails as `oom`, naming its peak.
"""

from __future__ import annotations

import logging
from typing import Any, NoReturn

from celery.exceptions import Ignore

from tbss_queue.execution.lease import Attempt, Claim, CommandFailed
from tbss_queue.execution.resources import Share
from tbss_queue.execution.runner import RunResult
from tbss_queue.queue.broker import patiently
from tbss_queue.sizes import human

log = logging.getLogger(__name__)


def hand_back(
    at: Attempt, claim: Claim, share: Share | None, result: RunResult, record: dict[str, Any]
) -> NoReturn:
    """Back to the queue unfailed (or failed as `oom` on the last node allowed); always raises."""
    peak = result.peak_rss or 0
    if share is not None:
        # here again only with room for its peak; never again if it was killed running alone
        alone = share.alone()
        need = share.ledger.budget + 1 if alone else max(share.need.mem, peak)
        share.ledger.raise_need(share.key, need)
        log.warning(
            "command %s of batch %s killed for memory (peak %s): this node now needs %s for it",
            at.task_id, at.batch_id, human(peak), "more than it has" if alone else human(need),
        )  # fmt: skip
    limit = at.settings.oom_limit
    outcome = patiently(
        lambda: at.store.requeue(
            at.batch_id,
            at.task_id,
            at.token,
            limit=1,
            count_loss=False,
            ignore_heartbeat=True,
            record=record,
            oom_limit=limit,
        ),  # fmt: skip
        at.patience,
    )
    if outcome == "requeued":
        at.republish(front=False)
        raise Ignore()
    if outcome == "oom":
        raise CommandFailed(f"{result.message}; killed so on {limit} nodes")
    raise Ignore()
