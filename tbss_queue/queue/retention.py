"""Retention: a batch ends when nothing of it is queued or running, its keys expire after
TBSS_QUEUE_KEEP, and the workers drop what still points to it."""

from __future__ import annotations

from collections.abc import Iterable

from tbss_queue.queue.keys import (
    ACTIVE,
    BATCHES,
    CHUNK,
    FILES,
    HELD,
    LEGACY_INDEX,
    PENDING,
    PREFIX,
    batch_key,
    ending_keys,
    index_buckets,
)
from tbss_queue.queue.store import Store


class Retention(Store):
    """Retention."""

    def active(self) -> list[str]:
        """Batches that have not ended (something queued, running or being applied)."""
        return [str(b) for b in self.r.smembers(ACTIVE)]

    def end(self, batch_id: str, keep: float) -> bool:
        """If the batch has nothing queued or running, it has ended: its keys expire after
        `keep` seconds. True if it ended now."""
        return bool(self._run("end", ending_keys(batch_id), [batch_id, max(1, int(keep))]))

    def forget(self, batch_id: str) -> int:
        """Drop every record of a batch now; returns the number of keys removed."""
        removed = 0
        names = [batch_key(batch_id)]
        for key in self.r.scan_iter(match=batch_key(batch_id, "*"), count=1000):
            names.append(key)
            if len(names) >= 500:
                removed += self.r.unlink(*names)
                names = []
        if names:
            removed += self.r.unlink(*names)
        self.drop_references({batch_id})
        return removed

    def expired(self) -> set[str]:
        """Batches still listed whose records have expired."""
        ids = self.batch_ids()
        pipe = self.r.pipeline(transaction=False)
        for b in ids:
            pipe.exists(batch_key(b))
        return {b for b, there in zip(ids, pipe.execute(), strict=True) if not there}

    def drop_references(self, gone: set[str]) -> int:
        """Remove what points to batches that are gone: their entries in the batch list, the
        active set, holds, files and the command index (scanned a chunk at a time)."""
        if not gone:
            return 0
        pipe = self.r.pipeline(transaction=False)
        pipe.zrem(BATCHES, *gone)
        pipe.srem(ACTIVE, *gone)
        pipe.hdel(PENDING, *gone)
        pipe.hdel(HELD, *gone)
        pipe.execute()
        # fsl_sub's job ids (fsl/jobs.py): a hash per job naming its batch
        jobs = list(self.r.scan_iter(match=PREFIX + "job:*", count=1000))
        if jobs:
            pipe = self.r.pipeline(transaction=False)
            for job in jobs:
                pipe.hget(job, "batch")
            ended_jobs = [j for j, b in zip(jobs, pipe.execute(), strict=True) if b in gone]
            if ended_jobs:
                self.r.unlink(*ended_jobs)
        dropped = self._drop_stale(FILES, self.r.hscan_iter(FILES, count=CHUNK), gone)
        if self.r.exists(LEGACY_INDEX):
            # the steps it was swept in before the split: a quarter of the usual
            entries = self.r.hscan_iter(LEGACY_INDEX, count=CHUNK // 4)
            dropped += self._drop_stale(LEGACY_INDEX, entries, gone, step=CHUNK // 4)
        return dropped + self._sweep_index(gone)

    def _sweep_index(self, gone: set[str]) -> int:
        """Drop the command index's entries that name these batches, a bucket at a time."""
        dropped, buckets = 0, index_buckets()
        for i in range(0, len(buckets), 64):
            pipe = self.r.pipeline(transaction=False)
            for bucket in buckets[i : i + 64]:
                pipe.hgetall(bucket)
            for bucket, entries in zip(buckets[i : i + 64], pipe.execute(), strict=True):
                if entries:
                    dropped += self._drop_stale(bucket, entries.items(), gone)
        return dropped

    def _drop_stale(
        self, key: str, entries: Iterable[tuple[str, str]], gone: set[str], step: int = CHUNK
    ) -> int:
        """Drop the entries of hash `key` whose value names a gone batch, `step` per script."""
        dropped, stale = 0, []
        for field, value in entries:
            if value.partition("|")[0] in gone:
                stale += [field, value]
            if len(stale) >= 2 * step:
                dropped += int(self._run("drop_entries", [key], stale))
                stale = []
        if stale:
            dropped += int(self._run("drop_entries", [key], stale))
        return dropped
