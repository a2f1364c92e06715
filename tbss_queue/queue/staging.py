"""Submissions: staged where no worker or reader sees them, committed in one step, applied a
chunk at a time; held batches (`--after`), released; cancel."""

from __future__ import annotations

import contextlib
import json
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import redis

from tbss_queue.config import DEFAULT_KEEP
from tbss_queue.queue.keys import (
    ACTIVE,
    BATCH_PARTS,
    BATCHES,
    CANCEL_CHANNEL,
    CHUNK,
    COMMAND_NAMESPACE,
    FILES,
    HELD,
    INDEX_DIGITS,
    LEGACY_INDEX,
    PENDING,
    QUEUED,
    STATES,
    Staging,
    TaskSpec,
    batch_key,
    enc,
    ending_keys,
    expire_staged,
    index_key,
    task_id_for,
)
from tbss_queue.queue.store import Store


class Submissions(Store):
    """Submissions."""

    def stage_meta(self, batch_id: str, sid: str, meta: dict[str, Any]) -> None:
        """Begin staging submission `sid`: its metadata, and a new batch's counters at 0."""
        s_meta, _, _, s_counts = Staging(batch_id, sid, "new", 0, None, 0).whole_keys
        pipe: Any = self.r.pipeline(transaction=False)
        pipe.hset(s_meta, mapping={k: enc(v) for k, v in meta.items()})
        pipe.hset(s_counts, mapping=dict.fromkeys(STATES, 0))
        expire_staged(pipe, [s_meta, s_counts])
        pipe.execute()

    def stage_part(
        self, staging: Staging, tasks: Sequence[TaskSpec], messages: Sequence[tuple[str, str]]
    ) -> None:
        """Stage one part of a submission (part number `staging.chunks`, from 1) where no worker
        or reader sees it yet: records of new tasks or of existing ones whose state changes,
        and their messages. A new batch is staged whole, to be adopted by RENAME; a merge in
        chunks that `apply` merges one per step."""
        s_meta, s_cmd, s_state, s_counts = staging.whole_keys
        if staging.mode == "merge":
            c_cmd, c_state, c_expect = staging.chunk_keys(staging.chunks - 1)
        else:
            c_cmd, c_state, c_expect = s_cmd, s_state, ""
        c_keys = staging.keys_key(staging.chunks - 1)
        touched = [s_meta, s_counts, c_cmd, c_state, c_keys, staging.messages_key]
        touched += [c_expect] if c_expect else []
        pipe: Any = self.r.pipeline(transaction=False)
        if tasks:
            pipe.hset(c_cmd, mapping={t.task_id: t.to_json() for t in tasks})
            pipe.hset(c_state, mapping={t.task_id: t.state for t in tasks})
        if c_expect and (expected := {t.task_id: t.expect for t in tasks if t.expect}):
            pipe.hset(c_expect, mapping=expected)
        if not c_expect:  # the counters of a new batch, which the commit adopts as they are
            for state, n in Counter(t.state for t in tasks).items():
                pipe.hincrby(s_counts, state, n)
        # the command index is written by `apply`, never before the commit: a submit that
        # loses the commit (or fails) has nothing of another's to undo there
        if keyed := {t.task_id: t.key for t in tasks if t.state == QUEUED and t.key}:
            pipe.hset(c_keys, mapping=keyed)
        if any(q != staging.queue for q, _ in messages):
            raise ValueError("all messages of a batch must go to one queue")
        if messages:
            pipe.lpush(staging.messages_key, *[m for _, m in messages])
        expire_staged(pipe, touched)
        pipe.execute()

    def commit(
        self,
        staging: Staging,
        file_key: str,
        *,
        file_owner: str = "*",
        releasing: bool = False,
        pending: dict[str, Any] | None = None,
    ) -> int:
        """The constant-time switch that makes a staged submission certain to be applied whole
        (then `apply` carries it out in bounded steps).

        `file_owner`: the batch the submitter found for this file ('' none, '*' don't check).
        Returns 1; -1 (a hold someone else released), -2 (another submit of this file
        committed first: plan again) or -3 (an earlier submission is still being applied)."""
        b = staging.batch_id
        keys = [
            batch_key(b),
            batch_key(b, "cmd"),
            batch_key(b, "state"),
            batch_key(b, "counts"),
            BATCHES,
            *staging.whole_keys,
            FILES,
            HELD,
            ACTIVE,
            PENDING,
            *(batch_key(b, p) for p in BATCH_PARTS[4:]),
            staging.messages_key,
            *(
                k
                for i in range(staging.chunks)
                for k in (*staging.chunk_keys(i), staging.keys_key(i))
            ),
        ]
        args = [
            b,
            time.time(),
            file_key,
            int(releasing),
            file_owner,
            staging.mode,
            staging.to_json(next=0, **(pending or {})),
        ]
        return int(self._run("commit", keys, args))

    def apply(self, batch_id: str, *, messages: bool = True) -> int:
        """Carry a committed submission out, one bounded step per script, until done. Any
        process may call it (a reaper finishes what a submitter that died began). Returns how
        many of the commands it queued were found queued, running or done in another batch by
        then (they are skipped), in the steps this call carried out. `messages=False`: stop
        once every change is applied, before the messages move (a cancel marks them first)."""
        elsewhere = 0
        while True:
            raw = self.r.hget(PENDING, batch_id)
            if not raw:
                return elsewhere
            staging = Staging.from_json(batch_id, raw)
            step = int(json.loads(raw)["next"])
            keys = [
                PENDING,
                batch_key(batch_id, "state"),
                batch_key(batch_id, "counts"),
                batch_key(batch_id, "cmd"),
                batch_key(batch_id),
                staging.messages_key,
                staging.queue or batch_key(batch_id, "noqueue"),
                *staging.chunk_keys(step),
                batch_key(batch_id, "failed"),
                staging.keys_key(step),
                *ending_keys(batch_id),
            ]
            args = [batch_id, staging.sid, step, CHUNK, index_key(""), INDEX_DIGITS]
            args += [COMMAND_NAMESPACE.bytes, batch_key(""), int(not messages), int(DEFAULT_KEEP)]
            # 'more' or 'stale': read the record again (the next step may use other keys)
            outcome, _, found = str(self._run("apply", keys, args)).partition(":")
            elsewhere += int(found or 0)
            if outcome in ("done", "states"):
                return elsewhere

    def pending(self) -> list[str]:
        """Batches with a committed submission still being applied."""
        return [str(b) for b in self.r.hkeys(PENDING)]

    def apply_pending(self) -> None:
        """Carry out every committed submission still being applied (their submitters may
        have died): before judging the queue, or tidying."""
        for batch_id in self.pending():
            self.apply(batch_id)
            raw = self.r.hget(PENDING, batch_id)
            if raw and json.loads(raw).get("cancel"):  # its canceller died before marking it
                self.cancel(batch_id)

    def hold(self, staging: Staging, file_key: str, after: Sequence[str]) -> None:
        """Keep a staged submission (no expiry) until every batch in `after` is done."""
        pipe: Any = self.r.pipeline(transaction=True)
        for key in staging.all_keys():
            pipe.persist(key)
        hold = {"after": list(after), "file_key": file_key, "staging": staging.to_json()}
        pipe.hset(HELD, staging.batch_id, json.dumps(hold))
        pipe.execute()

    def release(self, batch_id: str, *, cancel: str = "") -> bool:
        """Commit the held submission of `batch_id` now: True if this call did, False if it
        was not held (any more). With `cancel` (why, shown by `status` from its metadata) it is
        committed to be cancelled in the same step: no one applies its messages until every
        command of it is marked cancelled (`cancel`, which this call then does)."""
        hold = self.held().get(batch_id)
        if hold is None:
            return False
        staging: Staging = hold["staging"]
        if cancel:  # staged: it arrives with the commit, or not at all
            self.r.hset(staging.whole_keys[0], "dependency", enc(cancel))
        extra = {"cancel": True} if cancel else {}
        if self.commit(staging, hold["file_key"], releasing=True, pending=extra) < 0:
            return False
        if cancel:
            self.cancel(batch_id)
        return True

    def held(self) -> dict[str, dict[str, Any]]:
        """batch -> {after, file_key, staging}: submissions waiting for other batches."""
        out = {}
        for b, v in self.r.hgetall(HELD).items():
            hold = json.loads(v)
            out[b] = {**hold, "staging": Staging.from_json(b, hold["staging"])}
        return out

    def discard(self, staging: Staging) -> None:
        """Remove whatever a failed submit staged: the batch itself, and the command index
        (written only once a submission is committed), are untouched."""
        self.r.unlink(*staging.all_keys())

    def batch_for_file(self, file_key: str) -> str | None:
        """The batch an earlier submission of this file (same path, same cwd) created."""
        found = self.r.hget(FILES, file_key)
        return str(found) if found else None

    def states_of(self, batch_id: str, task_ids: Sequence[str]) -> dict[str, str]:
        if not task_ids:
            return {}
        out = {}
        key = batch_key(batch_id, "state")
        for i in range(0, len(task_ids), CHUNK):
            chunk = list(task_ids[i : i + CHUNK])
            out.update({t: s for t, s in zip(chunk, self.r.hmget(key, chunk), strict=True) if s})
        return out

    def live_tasks(self, keys: Iterable[str]) -> dict[str, tuple[str, str, str]]:
        """For command keys, the (batch, task, state) of their latest task, where one exists."""
        keys = list(keys)
        if not keys:
            return {}
        found: dict[str, tuple[str, str]] = {}
        legacy = bool(self.r.exists(LEGACY_INDEX))
        for i in range(0, len(keys), CHUNK):
            buckets: dict[str, list[str]] = {}
            for key in keys[i : i + CHUNK]:
                buckets.setdefault(index_key(key), []).append(key)
            pipe = self.r.pipeline(transaction=False)
            for bucket, some in buckets.items():
                pipe.hmget(bucket, some)
            for some, values in zip(buckets.values(), pipe.execute(), strict=True):
                for key, b in zip(some, values, strict=True):
                    if b:
                        found[key] = (b, task_id_for(b, key))
            missing = [k for k in keys[i : i + CHUNK] if k not in found] if legacy else []
            if missing:
                for key, v in zip(missing, self.r.hmget(LEGACY_INDEX, missing), strict=True):
                    if v:  # "B" or, older still, "B|task"
                        b, _, t = v.partition("|")
                        found[key] = (b, t or task_id_for(b, key))
        pipe = self.r.pipeline(transaction=False)
        items = list(found.items())
        for _, (b, t) in items:
            pipe.hget(batch_key(b, "state"), t)
        states = pipe.execute()
        return {k: (b, t, s) for (k, (b, t)), s in zip(items, states, strict=True) if s}

    def cancel(self, batch_id: str) -> int:
        """Mark queued and running tasks cancelled, a bounded step at a time; their runners are
        nudged to renew at once, and stop (a missed nudge: at their next renewal). A submission
        committed and not yet applied is applied first, so nothing it queues escapes."""
        keys = [batch_key(batch_id, "state"), batch_key(batch_id, "counts"), batch_key(batch_id)]
        keys += ending_keys(batch_id)
        cursor, total = "0", 0
        while True:
            cursor, n = self._run("cancel", keys, [cursor, CHUNK, batch_id, int(DEFAULT_KEEP)])
            if cursor == "pending":  # a committed submission's changes first, whoever began it
                self.apply(batch_id, messages=False)
                cursor = "0"
                continue
            total += int(n)
            if str(cursor) == "0":
                break
        self.apply(batch_id)  # its messages, if one was pending: the claims drop them
        # the runners renew now instead of at their next heartbeat, and so see the cancel; a
        # nudge is a courtesy (a user without pub/sub rights: the renewals do it)
        with contextlib.suppress(redis.RedisError):
            self.r.publish(CANCEL_CHANNEL, batch_id)
        return total
