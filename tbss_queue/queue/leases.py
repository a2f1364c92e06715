"""Claims and leases: one owner per command, its renewals, its hand-back and the message it
is owed when requeued; a node's fault with one command."""

from __future__ import annotations

import json
from typing import Any

from tbss_queue.config import DEFAULT_KEEP
from tbss_queue.queue.keys import (
    ALIVE,
    CHUNK,
    FAULTS,
    OWED,
    QUARANTINE,
    RUNNING,
    batch_key,
    ending_keys,
    lease_key,
    member,
    ms,
    run_line,
    task_keys,
)
from tbss_queue.queue.store import Store


class Leases(Store):
    """Claims and leases."""

    def claim(
        self,
        batch_id: str,
        task_id: str,
        node: str,
        token: str,
        lease: float,
        pid: int,
        attempt: str = "",
    ) -> tuple[str, int, int]:
        """Take a queued command under a lease of `lease` seconds held by `token`.

        Returns ('ok', its line, this attempt's number), or (why not, 0, 0): 'busy' (running
        elsewhere), 'leased' (an earlier runner still holds it), 'quarantined' (this node),
        a final state or 'unknown'."""
        keys = [
            *task_keys(batch_id, task_id),
            batch_key(batch_id, "attempts"),
            batch_key(batch_id),
            QUARANTINE,
            batch_key(batch_id, "cmd"),
        ]
        args = [task_id, member(batch_id, task_id), node, token, ms(lease), pid, attempt]
        reply = self._run("claim", keys, args)
        if isinstance(reply, list):
            return str(reply[0]), int(reply[2] or 0), int(reply[1] or 1)
        return str(reply), 0, 0

    def renew(self, batch_id: str, task_id: str, token: str, lease: float) -> str:
        """Extend the lease if `token` still owns it: 'ok', 'cancelled' or 'lost'."""
        keys = [batch_key(batch_id, "state"), RUNNING, lease_key(batch_id, task_id)]
        args = [task_id, member(batch_id, task_id), token, ms(lease)]
        return str(self._run("renew", keys, args))

    def requeue(
        self,
        batch_id: str,
        task_id: str,
        token: str,
        *,
        limit: int,
        count_loss: bool = True,
        ignore_heartbeat: bool = False,
        delay: float = 0.0,
        record: dict[str, Any] | None = None,
        oom_limit: int = 0,
    ) -> str:
        """Take a task from runner `token`: 'requeued', 'lost' (crash limit), 'alive' or 'gone'.
        A requeued task is owed a message from `delay` seconds on (see `republish_owed`).
        With `oom_limit`, the kernel killed it for memory: counted once per node, and failed
        as `oom` ('oom', `record`'s message extended) on the `oom_limit`-th node."""
        keys = [
            *task_keys(batch_id, task_id),
            batch_key(batch_id, "attempts"),
            batch_key(batch_id, "result"),
            batch_key(batch_id, "ended"),
            batch_key(batch_id, "failed"),
            OWED,
            batch_key(batch_id, "runs"),
        ]
        args = [task_id, member(batch_id, task_id), token, limit, int(count_loss)]
        args += [int(ignore_heartbeat), batch_id, int(DEFAULT_KEEP), delay]
        # a retried attempt's record, and its line in the run log: it ran, and failed
        args += [json.dumps(record), run_line(record)] if record is not None else ["", ""]
        args += [oom_limit]
        return str(self._run("release", [*keys, *ending_keys(batch_id)], args))

    def hand_back(
        self,
        batch_id: str,
        task_id: str,
        token: str,
        delay: float = 0.0,
        record: dict[str, Any] | None = None,
    ) -> str:
        """The owner gives its command up, unfailed (not a loss): 'requeued' (queue it again,
        in `delay` seconds, keeping `record` of the attempt), or 'gone' (cancelled meanwhile,
        or not ours any more)."""
        return self.requeue(
            batch_id,
            task_id,
            token,
            limit=1,
            count_loss=False,
            ignore_heartbeat=True,
            delay=delay,
            record=record,
        )

    def owe(self, batch_id: str, task_id: str) -> None:
        """A queued command's message was taken and is to be published again: owed from now."""
        self.r.zadd(OWED, {member(batch_id, task_id): self.redis_time()})

    def owed(self, until: float, count: int = CHUNK) -> list[str]:
        """Members ("B|task") owed a message since before Redis time `until`."""
        return [str(m) for m in self.r.zrangebyscore(OWED, "-inf", until, start=0, num=count)]

    def paid(self, batch_id: str, task_id: str) -> None:
        """A message was published for the command by other means (Celery's retry)."""
        self.r.zrem(OWED, member(batch_id, task_id))

    def node_fault(
        self,
        batch_id: str,
        task_id: str,
        node: str,
        token: str,
        reason: dict[str, Any],
        live_window: float,
        again_delay: float = 0.0,
    ) -> str:
        """Hand a command back for a reason of this node, which goes on with other work:
        'requeued', 'again' (this node had refused it before), 'failed' (every node taking
        commands refused it), 'gone' or 'not-owner'."""
        keys = [
            *task_keys(batch_id, task_id),
            batch_key(batch_id, "result"),
            batch_key(batch_id, "ended"),
            batch_key(batch_id, "refusals"),
            ALIVE,
            QUARANTINE,
            batch_key(batch_id, "failed"),
            OWED,
            FAULTS,
        ]
        args = [task_id, member(batch_id, task_id), node, token, json.dumps(reason), live_window]
        args += [batch_id, int(DEFAULT_KEEP), again_delay]
        return str(self._run("node_fault", [*keys, *ending_keys(batch_id)], args))

    def holders(self, batch_id: str) -> int:
        """Runners that still hold a command of the batch (a cancelled one may be stopping)."""
        return sum(1 for _ in self.r.hscan_iter(RUNNING, match=f"{batch_id}|*", count=1000))

    def attempt_of(self, batch_id: str, task_id: str) -> tuple[int, int]:
        """(line, attempt) of a command its runner has just claimed: the claim counts attempts
        (lua/claim.lua), so every attempt of a command, in any worker, has a number of its own."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hget(batch_key(batch_id, "cmd"), task_id)
        pipe.hget(batch_key(batch_id, "attempts"), task_id)
        spec, attempts = pipe.execute()
        line = int(json.loads(spec).get("line", 0)) if spec else 0
        return line, int(attempts or 1)

    def lease_alive(self, batch_id: str, task_id: str) -> bool:
        return bool(self.r.exists(lease_key(batch_id, task_id)))
