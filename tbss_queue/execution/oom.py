"""A command the kernel killed for want of memory: the node's fault, not the command's.

The runner calls it so (runner.CAUSE_OOM) when the command died of a SIGKILL none of ours sent
while the node's cgroup, or the machine, counted an OOM kill. It is handed back, not failed,
and this node admits less (its ledger raises what the command needs here); in the same Lua step
as the hand-back (release.lua) Redis counts the nodes that killed it so, and on the
TBSS_QUEUE_OOM_LIMIT-th it fails as `oom`, naming its peak. A node that killed it running
alone never starts it again; once every node online has, it fails as `oom` too (as a command
every node refuses fails: one node, as under `run`, would hand it round for ever otherwise).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any, NoReturn

from celery.exceptions import Ignore

from tbss_queue.execution import runner
from tbss_queue.execution.lease import Attempt, Claim, CommandFailed, claimed
from tbss_queue.execution.record import log_outcome, nothing_ran, record_end
from tbss_queue.execution.runner import RunResult
from tbss_queue.queue.broker import patiently
from tbss_queue.queue.keys import FAILED, batch_key
from tbss_queue.sizes import human

if TYPE_CHECKING:
    from tbss_queue.execution.resources import Share

log = logging.getLogger(__name__)


def as_oom(result: RunResult) -> RunResult:
    """A failure during which the kernel killed for memory, as the node's fault (`oom`)."""
    if result.cause == runner.CAUSE_OOM:
        return result
    why = f"{runner.oom_message(result.peak_rss)} (then: {result.message})"
    return replace(result, cause=runner.CAUSE_OOM, message=why)


def hand_back(
    at: Attempt, claim: Claim, share: Share | None, result: RunResult, record: dict[str, Any]
) -> NoReturn:
    """Back to the queue unfailed (or failed as `oom` on the last node allowed); always raises."""
    peak = result.peak_rss or 0
    if share is not None:
        # here again only with room for its peak; never again if it was killed running alone
        alone = share.alone()
        need = share.ledger.budget + 1 if alone else max(share.need.mem, peak)
        share.ledger.raise_need(share.key, need, peak)
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


def killed_on_every_node(at: Attempt) -> bool:
    """Whether every node online has had this command killed for memory (each then refuses
    it): it can start nowhere now, so it would go round the queue for ever."""
    live = at.store.live_nodes(at.settings.lost_after)
    pipe = at.store.r.pipeline(transaction=False)
    for node in live:
        pipe.hexists(batch_key(at.batch_id, "attempts"), f"oom:{at.task_id}|{node}")
    return bool(live) and all(pipe.execute())


def fail_everywhere(at: Attempt, peak: int) -> NoReturn:
    """Fail it as `oom` under a claim of this node's, naming its peak; always raises."""
    claim = claimed(at)
    message = (
        f"killed by the kernel for want of memory (OOM) at a peak of {human(peak)}, on every "
        "node online, the last time running alone"
    )
    record = {**nothing_ran(at, message, runner.CAUSE_OOM, claim), "peak_rss": peak}
    log_outcome(record_end(at, FAILED, record, ran=False), at.task_id, at)
    raise CommandFailed(message)
