"""The redis-py connection tbss-queue uses for its own bookkeeping (same Redis as the broker)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import redis

from .config import Settings
from .errors import BrokerUnavailable


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
    ssl_options = tuple(sorted((settings.ssl_options() or {}).items()))
    client = _client(redis_url(settings.broker), ssl_options, timeout)
    if check:
        try:
            client.ping()
        except redis.AuthenticationError as exc:
            raise BrokerUnavailable(
                f"broker {settings.display_broker} refused the credentials: {exc}"
            ) from None
        except redis.ResponseError as exc:
            if "NOAUTH" in str(exc) or "auth" in str(exc).lower():
                raise BrokerUnavailable(
                    f"broker {settings.display_broker} needs a password: {exc}"
                ) from None
            raise
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            hint = ""
            if settings.uses_tls and not settings.tls_cert and "EOF" in str(exc):
                hint = " (does Redis ask for a client certificate? give --tls-cert/--tls-key)"
            raise BrokerUnavailable(
                f"cannot reach broker {settings.display_broker}: {exc}{hint}"
            ) from None
    return client


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
