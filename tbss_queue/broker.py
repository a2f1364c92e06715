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


def connect(settings: Settings, *, check: bool = True) -> redis.Redis:
    """A Redis client for the broker; BrokerUnavailable (one line, no password) if unreachable."""
    ssl_options = tuple(sorted((settings.ssl_options() or {}).items()))
    client = _client(redis_url(settings.broker), ssl_options)
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
def _client(url: str, ssl_options: tuple[tuple[str, Any], ...] = ()) -> redis.Redis:
    # one pool per URL and process; the pool is created lazily, so a fork is harmless
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=5,
        health_check_interval=25,
        **dict(ssl_options),
    )
