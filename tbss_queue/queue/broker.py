"""The redis-py connection tbss-queue uses for its own bookkeeping (same Redis as the broker).

With a `sentinel://` broker the client is redis-py's `Sentinel.master_for`: every connection
asks the Sentinels for the current master, and a connection to a master that was demoted or
died is dropped and made again to the new one, so every bookkeeping call follows a failover
(calls made while there is no master fail with a ConnectionError, which `transient` waits out).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from functools import lru_cache
from typing import Any, TypeVar

import redis
import redis.sentinel
from kombu.exceptions import OperationalError
from redis.backoff import NoBackoff
from redis.retry import Retry

from tbss_queue.config import Settings, parse_sentinel_url
from tbss_queue.errors import BrokerUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")


def redis_url(url: str) -> str:
    """Spell a broker URL the way redis-py reads it."""
    if url.startswith("redis+socket://"):
        return "unix://" + url[len("redis+socket://") :]
    return url


TRANSIENT = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.TryAgainError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.MasterDownError,
)
"""Redis errors that pass: a restart, a failover, a full disk or memory being freed."""


def transient(exc: BaseException) -> bool:
    """True for an error worth waiting out (BUSY: a script over Redis's time limit; MISCONF:
    a failed save refuses writes until it works again)."""
    if isinstance(exc, TRANSIENT):
        return True
    return isinstance(exc, redis.ResponseError) and str(exc).startswith(("BUSY", "MISCONF"))


def patiently(fn: Callable[[], T], patience: float) -> T:
    """Call fn, waiting out a passing Redis fault (restart, BUSY, LOADING, OOM, MISCONF,
    READONLY, TRYAGAIN) with exponential backoff for up to `patience` seconds."""
    deadline = time.monotonic() + patience
    delay = 0.1
    while True:
        try:
            return fn()
        except redis.RedisError as exc:
            if not transient(exc) or time.monotonic() > deadline:
                raise
            log.warning("broker trouble (%s); trying again in %.1f s", exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


def broker_full(client: redis.Redis) -> BrokerUnavailable:
    """The one-line error for a Redis at its maxmemory that refuses writes (noeviction)."""
    try:
        info: Any = client.info("memory")
        limit = int(info.get("maxmemory", 0)) / 2**20
        used = int(info.get("used_memory", 0)) / 2**20
        policy = info.get("maxmemory_policy", "?")
        where = f" ({used:.0f} MiB used of maxmemory {limit:.0f} MiB, policy {policy})"
    except redis.RedisError:
        where = ""
    return BrokerUnavailable(
        f"the broker is out of memory{where}: nothing was queued; running commands go on. "
        "Free space with `tbss-queue forget BATCH` (see `tbss-queue batches`) or raise "
        "Redis's maxmemory, then submit again"
    )


SOCKET_TIMEOUT = 15.0
"""Seconds a bookkeeping call may wait for Redis (a long commit takes seconds at 1M commands);
past that a half-open connection is dropped and the call fails instead of hanging."""


def connect(
    settings: Settings, *, check: bool = True, timeout: float = SOCKET_TIMEOUT
) -> redis.Redis:
    """A Redis client for the broker; BrokerUnavailable (one line, no password) if unreachable.

    Every client has a socket timeout, TCP keepalive and a health check, so a connection that
    died without a FIN (a cut cable, a paused peer) fails a call instead of blocking it."""
    if settings.uses_sentinel:
        client = _sentinel_client(
            settings.broker, settings.sentinel_master, settings.sentinel_password, timeout
        )
    else:
        ssl_options = tuple(sorted((settings.ssl_options() or {}).items()))
        client = _client(redis_url(settings.broker), ssl_options, timeout)
    if check and settings.uses_sentinel:
        _check_sentinel(settings, client)
    elif check:
        hint = ""
        if settings.uses_tls and not settings.tls_cert:
            hint = " (does Redis ask for a client certificate? give --tls-cert/--tls-key)"
        _ping(client, f"broker {settings.display_broker}", "the credentials", "", hint)
    return client


def _ping(client: redis.Redis, who: str, credentials: str, password_hint: str, eof: str) -> None:
    """PING, with every way it can fail as one line naming `who`: refused credentials, a
    missing password (`password_hint` says where to give it), or no connection (`eof`: a
    hint for a connection closed at once, as by a TLS server wanting a certificate)."""
    try:
        client.ping()
    except redis.AuthenticationError as exc:
        raise BrokerUnavailable(f"{who} refused {credentials}: {exc}") from None
    except redis.ResponseError as exc:
        if "NOAUTH" in str(exc) or "auth" in str(exc).lower():
            raise BrokerUnavailable(f"{who} needs a password: {password_hint or exc}") from None
        raise
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        if isinstance(exc, redis.sentinel.MasterNotFoundError):
            raise  # the caller says what the Sentinels see
        hint = eof if "EOF" in str(exc) else ""
        raise BrokerUnavailable(f"cannot reach {who}: {exc}{hint}") from None


@lru_cache(maxsize=8)
def _client(
    url: str, ssl_options: tuple[tuple[str, Any], ...] = (), timeout: float = SOCKET_TIMEOUT
) -> redis.Redis:
    # one pool per URL, timeout and process; the pool is created lazily, so a fork is harmless
    tcp = {} if url.startswith("unix://") else {"socket_keepalive": True}
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=min(5.0, timeout),
        socket_timeout=timeout,
        health_check_interval=10,
        **tcp,
        **dict(ssl_options),
    )


@lru_cache(maxsize=8)
def _sentinel_client(
    url: str, master: str, sentinel_password: str | None, timeout: float = SOCKET_TIMEOUT
) -> redis.Redis:
    """The master of `master` as the Sentinels of `url` name it, followed across failovers."""
    parsed = parse_sentinel_url("--broker", url)
    timeouts = {
        "socket_connect_timeout": min(5.0, timeout),
        "socket_timeout": min(5.0, timeout),
        "socket_keepalive": True,
    }
    sentinels = redis.sentinel.Sentinel(
        list(parsed.sentinels),
        # no retry with backoff per Sentinel: the next Sentinel in the list is the retry, and
        # callers wait out a failover themselves (`transient`)
        sentinel_kwargs={**timeouts, "password": sentinel_password, "retry": Retry(NoBackoff(), 0)},
    )
    client: redis.Redis = sentinels.master_for(
        master,
        db=parsed.db,
        username=parsed.username,
        password=parsed.password,
        decode_responses=True,
        socket_connect_timeout=min(5.0, timeout),
        socket_timeout=timeout,
        socket_keepalive=True,
        health_check_interval=10,
    )
    return client


def sentinels_of(client: redis.Redis) -> redis.sentinel.Sentinel:
    """The Sentinels behind a client `connect` made for a sentinel:// broker."""
    manager = getattr(client.connection_pool, "sentinel_manager", None)
    if not isinstance(manager, redis.sentinel.Sentinel):
        raise TypeError("not a client of a sentinel:// broker")
    return manager


def _check_sentinel(settings: Settings, client: redis.Redis) -> None:
    """BrokerUnavailable, in one line naming what is wrong: no Sentinel answers, a Sentinel
    wants a password, none knows the master name, the master is down, or the master refuses
    the URL's credentials."""
    shown, name = settings.display_broker, settings.sentinel_master
    manager = sentinels_of(client)
    answers: list[dict[str, Any]] = []
    errors: list[str] = []
    for node in manager.sentinels:
        where = "{host}:{port}".format_map(node.connection_pool.connection_kwargs)
        try:
            masters = node.sentinel_masters()
            # RESP2 answers a dict by master name, RESP3 a list of the masters' fields
            answers.append(
                masters if isinstance(masters, dict) else {m["name"]: m for m in masters}
            )
        except (redis.AuthenticationError, redis.ResponseError) as exc:
            if not isinstance(exc, redis.AuthenticationError) and "AUTH" not in str(exc):
                errors.append(f"{where}: {exc}")
                continue
            option = "--sentinel-password / TBSS_QUEUE_SENTINEL_PASSWORD"
            if settings.sentinel_password:
                raise BrokerUnavailable(
                    f"Sentinel {where} refused the password ({option})"
                ) from None
            raise BrokerUnavailable(f"Sentinel {where} needs a password: give {option}") from None
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            errors.append(f"{where}: {exc}")
    if not answers:
        raise BrokerUnavailable(f"no Sentinel of {shown} answers ({'; '.join(errors)})")
    known = sorted({n for masters in answers for n in masters})
    if not any(name in masters for masters in answers):
        raise BrokerUnavailable(
            f"the Sentinels of {shown} know no master named {name!r} (they know: "
            f"{', '.join(known) or 'none'}); set --sentinel-master / TBSS_QUEUE_SENTINEL_MASTER"
        )
    try:
        _ping(
            client,
            f"master {name!r} of {shown}",
            "the URL's credentials",
            "put it in the URL, sentinel://:PASSWORD@host:26379",
            "",
        )
    except redis.sentinel.MasterNotFoundError:
        raise BrokerUnavailable(
            f"the Sentinels of {shown} see master {name!r} down and have not promoted a "
            "replica (yet)"
        ) from None


REPLICA_WAIT_MS = 1000
"""How long a write that must survive a failover (a claim, a finish, a submit's commit) waits
for a replica to confirm it, with a sentinel:// broker."""

NO_REPLICA_BACKOFF = 60.0
"""Seconds this process stops waiting for replicas after none confirmed in time (a master
without a replica would otherwise cost every claim and finish a full REPLICA_WAIT_MS)."""

FENCE_CHANNEL = "tbssq:replicated"
"""A channel nobody listens to. Publishing on it is a replicated no-op: it puts the connection
that then sends WAIT past every write this process had acknowledged before, whichever pooled
connection carried those writes (WAIT only counts the sending connection's own writes)."""

_no_replica_until = 0.0


def replicated(client: redis.Redis, settings: Settings) -> bool | None:
    """Wait (up to REPLICA_WAIT_MS) until a replica holds every write acknowledged to this
    process so far: a failover that promotes that replica then keeps them.

    Redis replicates asynchronously, so without this a write the master acknowledged can be
    lost when the master dies a moment later. Returns None when there is nothing to wait for
    (not a sentinel:// broker, or no replica confirmed lately), True or False for whether a
    replica confirmed in time. A connection error propagates: the master went away before
    any replica confirmed, so the write may be lost; the caller decides what to do again."""
    global _no_replica_until
    if not settings.uses_sentinel or time.monotonic() < _no_replica_until:
        return None
    pipe = client.pipeline(transaction=False)
    pipe.publish(FENCE_CHANNEL, "")
    pipe.execute_command("WAIT", 1, REPLICA_WAIT_MS)
    _, acked = pipe.execute()
    if int(acked) >= 1:
        return True
    _no_replica_until = time.monotonic() + NO_REPLICA_BACKOFF
    return False


BROKER_DOWN = (redis.ConnectionError, redis.TimeoutError, OperationalError, ConnectionError)
"""What a call raises while the broker is out of reach."""


class BrokerWatch:
    """One line when the broker stops answering, one when it is back, for the whole node: the
    health thread and the reaper both meet an outage, every beat, and a traceback each time
    would bury what happened (the batch loses nothing; they simply try again)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._since: float | None = None

    def failed(self, what: str, exc: BaseException) -> None:
        """A periodic check failed: an outage is said once; anything else, with its cause."""
        if not isinstance(exc, BROKER_DOWN):
            log.warning("%s failed; retrying", what, exc_info=exc)
            return
        with self._lock:
            if self._since is not None:
                return
            self._since = time.monotonic()
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.warning("broker unreachable (%s); retrying every heartbeat", first)

    def answered(self) -> None:
        with self._lock:
            since, self._since = self._since, None
        if since is not None:
            log.warning("broker back after %.0f s", time.monotonic() - since)


BROKER = BrokerWatch()
"""This node's view of the broker, shared by its health thread and its reaper."""
