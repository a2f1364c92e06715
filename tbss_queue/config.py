"""Settings: resolved once, explicit arguments > TBSS_QUEUE_* environment > defaults."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .errors import ConfigError

DEFAULT_BROKER = "redis://localhost:6379/0"
"""Where the queue lives when nothing else is said."""

DEFAULT_QUEUE = "tbss-queue"
"""The Celery queue (a Redis list) the commands go to."""

DEFAULT_TIME_LIMIT = 6 * 3600
"""Seconds one command may run. fsl_reg takes 3-5 min (FNIRT on 1 mm can take 30+), so 6 h
only stops hung processes; per batch `--time-limit` overrides it."""

DEFAULT_VISIBILITY_TIMEOUT = 12 * 3600
"""Seconds before Redis hands an unacknowledged message out again. Must exceed the longest
time limit, or long commands run twice; worker loss is detected by heartbeats instead."""

DEFAULT_HEARTBEAT = 10.0
"""Seconds between heartbeats of a running command."""

DEFAULT_LOST_AFTER = 60.0
"""Seconds without a heartbeat after which a running command's node counts as lost."""

DEFAULT_CRASH_LIMIT = 3
"""Lost-worker requeues of one command before it is failed as `lost`."""

ENV_PREFIX = "TBSS_QUEUE_"


@dataclass(frozen=True)
class Settings:
    """What the queue is: shared by every producer, worker and monitor of one study."""

    broker: str = DEFAULT_BROKER
    result_backend: str | None = None
    queue: str = DEFAULT_QUEUE
    time_limit: int = DEFAULT_TIME_LIMIT
    visibility_timeout: int = DEFAULT_VISIBILITY_TIMEOUT
    heartbeat: float = DEFAULT_HEARTBEAT
    lost_after: float = DEFAULT_LOST_AFTER
    crash_limit: int = DEFAULT_CRASH_LIMIT
    broker_explicit: bool = field(default=False, compare=False)

    @classmethod
    def resolve(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from explicit overrides (None = not given), then the environment."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == "broker_explicit":
                continue
            given = overrides.pop(f.name, None)
            if given is not None:
                values[f.name] = given
                continue
            var = ENV_PREFIX + f.name.upper()
            raw = env.get(var)
            if raw is not None and raw != "":
                values[f.name] = _convert(var, raw, f.type)
        if overrides:
            raise TypeError(f"unknown settings: {', '.join(sorted(overrides))}")
        values["broker_explicit"] = "broker" in values
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Refuse combinations that would run commands twice or never notice a loss."""
        if not self.broker.startswith(("redis://", "rediss://", "redis+socket://", "unix://")):
            raise ConfigError(
                f"--broker / {ENV_PREFIX}BROKER: {mask_url(self.broker)!r} is not a Redis URL "
                "(redis://, rediss:// or redis+socket://)"
            )
        if self.visibility_timeout <= self.time_limit:
            raise ConfigError(
                f"{ENV_PREFIX}VISIBILITY_TIMEOUT ({self.visibility_timeout} s) must be larger than "
                f"the time limit ({self.time_limit} s), otherwise Redis hands a still-running "
                "command to a second worker"
            )
        if self.lost_after <= 2 * self.heartbeat:
            raise ConfigError(
                f"{ENV_PREFIX}LOST_AFTER ({self.lost_after} s) must be more than twice "
                f"{ENV_PREFIX}HEARTBEAT ({self.heartbeat} s)"
            )
        if self.crash_limit < 1:
            raise ConfigError(f"{ENV_PREFIX}CRASH_LIMIT must be at least 1")

    def with_(self, **changes: Any) -> Settings:
        """A copy with some fields changed, validated again."""
        new = replace(self, **changes)
        new.validate()
        return new

    @property
    def backend_url(self) -> str:
        """The Celery result backend: the broker's Redis unless configured otherwise."""
        return self.result_backend or self.broker

    @property
    def display_broker(self) -> str:
        """The broker URL as it may be printed: password masked."""
        return mask_url(self.broker)


def _convert(var: str, raw: str, kind: Any) -> Any:
    kind = str(kind)
    try:
        if "int" in kind:
            return int(raw)
        if "float" in kind:
            return float(raw)
    except ValueError:
        raise ConfigError(f"{var}={raw!r} is not a number") from None
    return raw


def mask_url(url: str) -> str:
    """Hide the password of a URL: redis://user:secret@host -> redis://user:***@host."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def cpu_count() -> int:
    """CPUs this process may use (affinity-aware), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)
