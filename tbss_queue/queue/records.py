"""Records and the run log: an attempt's outcome written by its lease's owner, and every
read of a batch (its metadata, snapshot, states, records, run log)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from tbss_queue.config import DEFAULT_KEEP
from tbss_queue.errors import BatchNotFound
from tbss_queue.queue.keys import (
    BATCHES,
    CHUNK,
    HELD,
    PENDING,
    QUEUED,
    RUNNING,
    RUNNING_STATE,
    batch_key,
    dec,
    ending_keys,
    member,
    run_line,
    task_keys,
)
from tbss_queue.queue.store import Store


class Records(Store):
    """Records and the run log."""

    def finish(
        self,
        batch_id: str,
        task_id: str,
        node: str,
        token: str,
        state: str,
        record: dict[str, Any],
        *,
        ran: bool = True,
    ) -> str:
        """Record the outcome of one attempt: 'ok', 'not-owner' (nothing recorded) or the state
        the command had left `running` for (cancelled). An attempt in which nothing ran
        (`ran=False`: skipped, refused) has no line in the run log: it has no time to show."""
        keys = [
            *task_keys(batch_id, task_id),
            batch_key(batch_id, "result"),
            batch_key(batch_id, "ended"),
            batch_key(batch_id),
            batch_key(batch_id, "runs"),
            batch_key(batch_id, "failed"),
        ]
        args = [
            task_id,
            member(batch_id, task_id),
            node,
            token,
            state,
            json.dumps(record),
            record.get("duration", 0.0),
            run_line(record) if ran else "",
            batch_id,
            int(DEFAULT_KEEP),
            record.get("peak_rss") or "",
        ]
        return str(self._run("finish", [*keys, *ending_keys(batch_id)], args))

    def meta(self, batch_id: str) -> dict[str, Any]:
        return {k: dec(v) for k, v in self.r.hgetall(batch_key(batch_id)).items()}

    def latest_batch_id(self) -> str:
        ids = self.r.zrange(BATCHES, -1, -1)
        if not ids:
            raise BatchNotFound("no batch has been submitted to this broker yet")
        return str(ids[0])

    def resolve_id(self, batch_id: str | None) -> str:
        """The full id of a batch given by id or unique prefix; None means the latest batch."""
        if batch_id is None:
            return self.latest_batch_id()
        if self.r.zscore(BATCHES, batch_id) is not None:
            return batch_id
        matches = [b for b in self.batch_ids() if b.startswith(batch_id)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            waiting = self.r.hget(HELD, batch_id)
            if waiting:
                after = ", ".join(json.loads(waiting)["after"])
                raise BatchNotFound(f"batch {batch_id} is held until batch(es) {after} end")
            raise BatchNotFound(f"batch {batch_id!r} not found (see `tbss-queue batches`)")
        raise BatchNotFound(f"batch prefix {batch_id!r} is ambiguous: {', '.join(matches)}")

    def snapshot(self, batch_id: str, window: float = 600.0) -> dict[str, Any]:
        """Everything `status` needs, in a fixed number of commands; times are Redis's, like
        those the workers record. `recent` counts the commands that ended in the `window`
        before `until`: now while the batch runs, its last command's end once it has ended
        (so that an ended batch's figures stay as they were at its end)."""
        now = self.redis_time()
        pipe = self.r.pipeline(transaction=False)
        pipe.hgetall(batch_key(batch_id))
        pipe.hgetall(batch_key(batch_id, "counts"))
        pipe.hgetall(batch_key(batch_id, "nodes"))
        pipe.zcount(batch_key(batch_id, "ended"), now - window, "+inf")
        pipe.hexists(PENDING, batch_id)
        pipe.hmget(batch_key(batch_id, "attempts"), ["requeued", "lost"])
        meta, counts, nodes, recent, applying, (requeued, lost) = pipe.execute()
        if not meta or "committed" not in meta:
            raise BatchNotFound(f"batch {batch_id!r} not found (see `tbss-queue batches`)")
        counts = {k: int(v) for k, v in counts.items()}
        until = now
        busy = counts.get(QUEUED, 0) + counts.get(RUNNING_STATE, 0)
        last = meta.get("last_ended")
        if not busy and not applying and last:  # ended: frozen at its last command's end
            until = float(last)
            recent = self.r.zcount(batch_key(batch_id, "ended"), until - window, until)
        return {
            "meta": {k: dec(v) for k, v in meta.items()},
            "counts": counts,
            "nodes": nodes,
            "recent": int(recent),
            "applying": bool(applying),
            "requeued": int(requeued or 0),
            "lost": int(lost or 0),
            "now": now,
            "until": until,
            "window": window,
        }

    def task_specs(
        self, batch_id: str, task_ids: Sequence[str] | None = None
    ) -> dict[str, dict[str, Any]]:
        """task id -> {line, argv, key, note}: every task of the batch, or the ones named."""
        return self._json_fields(batch_key(batch_id, "cmd"), task_ids)

    def states(self, batch_id: str) -> dict[str, str]:
        """task id -> state, read a chunk at a time (one HGETALL of a million entries would
        block Redis for a second)."""
        return dict(self.r.hscan_iter(batch_key(batch_id, "state"), count=CHUNK))

    def results(
        self, batch_id: str, task_ids: Sequence[str] | None = None
    ) -> dict[str, dict[str, Any]]:
        """task id -> record of its last attempt: every task that has one, or the ones named."""
        return self._json_fields(batch_key(batch_id, "result"), task_ids)

    def _json_fields(self, key: str, fields: Sequence[str] | None) -> dict[str, dict[str, Any]]:
        """The JSON values of a hash: all of them, or those of `fields` that exist; read a
        chunk at a time."""
        if fields is None:
            return {f: json.loads(v) for f, v in self.r.hscan_iter(key, count=CHUNK)}
        out = {}
        for i in range(0, len(fields), CHUNK):
            part = list(fields[i : i + CHUNK])
            raw = self.r.hmget(key, part)
            out.update({f: json.loads(v) for f, v in zip(part, raw, strict=True) if v})
        return out

    def runs(self, batch_id: str) -> list[str]:
        """The batch's run log, a line per recorded attempt (see `run_line`), oldest first,
        read a chunk at a time."""
        key, out = batch_key(batch_id, "runs"), []
        for start in range(0, self.r.llen(key), 5 * CHUNK):
            out += self.r.lrange(key, start, start + 5 * CHUNK - 1)
        return out

    def failed_ids(self, batch_id: str) -> list[str]:
        """The commands of the batch that are failed now."""
        return [str(t) for t in self.r.smembers(batch_key(batch_id, "failed"))]

    def running(self, batch_id: str | None = None) -> dict[str, dict[str, Any]]:
        """Running records ("batch|task" -> record), optionally of one batch."""
        out = {}
        for m, v in self.r.hgetall(RUNNING).items():
            if batch_id is None or m.startswith(batch_id + "|"):
                out[m] = json.loads(v)
        return out
