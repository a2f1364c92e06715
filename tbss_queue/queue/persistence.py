"""Does the broker keep its data across a restart, and was a missing batch lost in one?

A Redis without AOF and without RDB snapshots keeps everything in memory: a restart empties
it, and every queued command, batch record and counter is gone without a trace. Two things
help a person notice:

* `persistence` / `persistence_warning`: what the broker is configured to do (worker start-up,
  `submit`, `doctor`).
* `eviction_warning`: a broker that may evict keys when memory runs out (any maxmemory-policy
  but `noeviction`) can drop a lease, and with it the proof of who runs a command.
* the epoch key `tbssq:epoch` (HASH, field `run_id`): written once with HSETNX by `remember`
  when a batch is submitted, holding the run_id of the Redis process of that moment. It lives
  and dies with the rest of the data, so it marks *this dataset*: it survives a restart
  exactly when the batches do, and is missing (or written anew, with the run_id of a later
  process) after data was lost. Redis gives every process a new random run_id (INFO server),
  so comparing the two tells "restarted but kept its data" from "restarted empty";
  `lost_batch_message` turns that into one line for a batch id that cannot be found.

A Sentinel failover also brings a new run_id (the promoted replica's) but keeps the data: the
mark, replicated like everything else, still holds the old one. A promoted replica is told
apart from a restarted master by its second replication id (INFO replication
`master_replid2`: the id of the master it followed), so that a broker that keeps its data by
replication rather than on disk is not taken for one that lost it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis

from tbss_queue.errors import BatchNotFound
from tbss_queue.queue.keys import BATCHES, HELD, PREFIX

EPOCH = PREFIX + "epoch"
"""HASH, field `run_id`: the Redis run_id when this dataset's first batch was submitted."""

EPOCH_FIELD = "run_id"

EXIT_LOST = 4
"""Exit code of a batch the broker lost in a restart: resubmitting the file is the fix, not
retyping the id (2) or fixing the connection (3)."""

FIX = "enable appendonly yes (deploy/redis.conf does)"

RESUBMIT = "resubmit the file; done fsl_reg pairs are skipped by their outputs"


class BatchLost(BatchNotFound):
    """Raised when a batch is missing because the broker restarted without persistence.

    A BatchNotFound, so every `except BatchNotFound` still catches it; its own exit code
    tells scripts that resubmitting the commands file is what to do."""

    exit_code = EXIT_LOST


@dataclass(frozen=True)
class Persistence:
    """How the broker keeps its data; None where Redis would not say."""

    aof: bool | None
    """appendonly (INFO persistence `aof_enabled`)."""
    rdb: bool | None
    """RDB snapshots (CONFIG GET save is not empty); None when CONFIG is refused or renamed,
    as on many managed Redis services."""
    run_id: str
    """This Redis process's run_id (INFO server): a new random one at every start."""
    promoted: bool = False
    """This master was a replica until a failover (INFO replication `master_replid2` is set):
    its data came from the old master, not from a restart."""

    @property
    def durable(self) -> bool | None:
        """True if AOF or RDB is on, False if both are off, None if that cannot be told."""
        if self.aof or self.rdb:
            return True
        if self.aof is None or self.rdb is None:
            return None
        return False

    def describe(self) -> str:
        """One phrase, e.g. 'AOF on, RDB snapshots off'."""

        def word(on: bool | None) -> str:
            return "unknown" if on is None else ("on" if on else "off")

        rdb = word(self.rdb) + (" (CONFIG GET refused)" if self.rdb is None else "")
        return f"AOF {word(self.aof)}, RDB snapshots {rdb}"


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def persistence(client: redis.Redis) -> Persistence:
    """Ask the broker (one round trip) whether it writes an AOF or RDB snapshots.

    Connection errors propagate; a refused INFO section or CONFIG (ACLs, managed Redis)
    leaves that part unknown."""
    pipe = client.pipeline(transaction=False)
    pipe.info("persistence")
    pipe.config_get("save")
    pipe.info("server")
    pipe.info("replication")
    info, save, server, replication = pipe.execute(raise_on_error=False)  # refusals: values
    aof: bool | None = None
    if isinstance(info, dict) and info.get("aof_enabled") is not None:
        aof = str(info["aof_enabled"]) == "1"
    rdb: bool | None = None
    if isinstance(save, dict):
        rules = _text(save.get("save", save.get(b"save")))
        rdb = None if rules is None else bool(rules.strip())
    run_id = _text(server.get("run_id")) if isinstance(server, dict) else None
    replid2 = _text(replication.get("master_replid2")) if isinstance(replication, dict) else None
    return Persistence(
        aof=aof,
        rdb=rdb,
        run_id=run_id or "",
        promoted=bool(replid2.strip("0")) if replid2 else False,
    )


def persistence_warning(client: redis.Redis) -> str | None:
    """One line when the broker keeps its data in memory only; None if it persists it, if
    that cannot be told, or if Redis cannot be asked (a warning never stops anything)."""
    try:
        state = persistence(client)
    except redis.RedisError:
        return None
    if state.durable is not False:
        return None
    return (
        "the broker keeps its data in memory only (no AOF, no RDB): a Redis restart loses "
        f"every queued command; {FIX}"
    )


def server_run_id(client: redis.Redis) -> str:
    """The run_id of the Redis process answering now (changes at every restart)."""
    return _text(client.info("server").get("run_id")) or ""


def epoch(client: redis.Redis) -> str | None:
    """The run_id stored by `remember`, or None if this dataset has none (yet, or any more)."""
    return _text(client.hget(EPOCH, EPOCH_FIELD))


def remember(client: redis.Redis) -> None:
    """Mark this dataset with the current run_id unless it is marked already (HSETNX).

    Call it whenever a batch is submitted. Never overwritten: after a restart that kept the
    data the mark keeps the old run_id (which is how a kept dataset is recognised); after one
    that lost it, the next submit marks the empty dataset with the new process's run_id."""
    client.hsetnx(EPOCH, EPOCH_FIELD, server_run_id(client))


def _batch_exists(client: redis.Redis, batch_id: str) -> bool:
    """The id, or a batch it is a prefix of, is committed or held (waiting for others)."""
    if client.zscore(BATCHES, batch_id) is not None or client.hexists(HELD, batch_id):
        return True
    known = [_text(b) or "" for b in client.zrange(BATCHES, 0, -1)]
    known += [_text(b) or "" for b in client.hkeys(HELD)]
    return any(b.startswith(batch_id) for b in known)


def _has_batches(client: redis.Redis) -> bool:
    return bool(client.zcard(BATCHES) or client.hlen(HELD))


def lost_batch_message(client: redis.Redis, batch_id: str, known_run_id: str | None) -> str | None:
    """Why `batch_id` cannot be found, if the reason is a restart that lost the broker's
    data; None when the batch exists, or when it was not lost that way (a typo, another
    broker or database, the id of a batch never submitted here).

    `known_run_id`: what the caller saw when it last saw the batch (`server_run_id` at
    submit or at the start of `wait`; the value of `epoch` works too), or None for a caller
    that only holds an id, such as `status 3f2a...` typed by a person.

    What can be told:

    * A caller with `known_run_id` knows the batch existed. If Redis has restarted since
      (a different run_id now) and the dataset mark is gone, or was written anew by the
      current process, or the broker has no persistence, the batch was lost in that restart.
      If Redis has not restarted since, or the mark survived on a durable broker, it was not.
    * A caller with only an id: a surviving mark means the data survived every restart since
      batches were first submitted, so an unknown id is a wrong id (None). No mark and no
      batch on a broker without (known) persistence is the lost-data case, stated with an
      "if": an empty non-durable broker looks the same whether it lost a batch or never had
      one. No mark on a durable broker means no batch was ever submitted here (None).

    What cannot be told: which batches a non-durable broker held before it was emptied (that
    knowledge was in the lost data, and the mark does not list batch ids), and the last second
    of writes an AOF with `appendfsync everysec` (or the writes after the last RDB snapshot)
    may lose in a crash while the mark itself survives.
    """
    known_run_id = known_run_id or None
    if _batch_exists(client, batch_id):
        return None
    state = persistence(client)
    mark = epoch(client)
    if known_run_id is not None and known_run_id in (state.run_id, mark):
        return None  # no restart since the caller saw the batch, or its data survived
    lost = f"the broker restarted without persistence: batch {batch_id} was lost; {RESUBMIT}"
    if state.promoted:
        # a failover: the data came from the replica, whatever the disk settings say
        lost = (
            f"the broker failed over to a replica that does not hold batch {batch_id} (Redis "
            f"replicates asynchronously; the old master had not passed it on); {RESUBMIT}"
        )
    if mark is None:
        if _has_batches(client):
            return None  # data kept, just never marked (batches from an older tbss-queue)
        if known_run_id is not None:
            return lost
        if state.durable:
            return None  # a restart would have kept it: never submitted to this broker
        memory = (
            "keeps its data in memory only (no AOF, no RDB)"
            if state.durable is False
            else "may keep its data in memory only (its persistence cannot be read)"
        )
        return (
            f"batch {batch_id} not found and the broker holds no batch: it {memory}, so if "
            f"{batch_id} was submitted here a Redis restart lost it; {RESUBMIT}"
        )
    if known_run_id is None:
        return None  # the data survived since the first submit: the id is wrong
    if mark == state.run_id:
        return lost  # marked anew after the restart the caller missed
    if state.durable is False and not state.promoted:
        return lost  # nothing persists, and no replica handed the data over
    return None


def lost_or_not_found(
    client: redis.Redis, batch_id: str, known_run_id: str | None, exc: BatchNotFound
) -> BatchNotFound:
    """The error to raise for a BatchNotFound: BatchLost when `lost_batch_message` says the
    batch was lost, else a plain BatchNotFound. Redis trouble while finding out keeps `exc`:
        except BatchNotFound as exc:
            raise lost_or_not_found(client, bid, known, exc) from None
    """
    try:
        message = lost_batch_message(client, batch_id, known_run_id)
    except redis.RedisError:
        return exc
    if message is not None:
        return BatchLost(message)
    if isinstance(exc, BatchLost):  # an earlier guess without known_run_id; this one knows
        return BatchNotFound(f"batch {batch_id!r} not found (see `tbss-queue batches`)")
    return exc


def eviction_warning(client: redis.Redis) -> str | None:
    """One line when the broker may evict keys under memory pressure; None for `noeviction`,
    or when the policy cannot be asked (CONFIG disabled on a managed Redis: doctor says so).

    `volatile-*` policies evict exactly the keys that carry a TTL: the leases, so that a
    running command's ownership would end at the mercy of memory, and with `allkeys-*` any
    record may go."""
    try:
        policy = client.config_get("maxmemory-policy").get("maxmemory-policy")
    except redis.RedisError:
        return None
    if policy in (None, "noeviction"):
        return None
    return (
        f"the broker's maxmemory-policy is {policy}: under memory pressure Redis may evict "
        "leases and records, and a command could then run twice; set maxmemory-policy "
        "noeviction (deploy/redis.conf does)"
    )
