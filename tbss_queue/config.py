"""Settings: resolved once, explicit arguments > TBSS_QUEUE_* environment > defaults."""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from tbss_queue.errors import ConfigError

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

LEASE_SLACK_HEARTBEATS = 2
"""Heartbeats a runner's margin (`Settings.runner_margin`) must hold: one renewal interval, plus
one more for a renewal that is slow or times out (its socket timeout is half a heartbeat) and
for the tick loop's own delay. With less, a healthy command is killed at its first renewal."""

DEFAULT_CRASH_LIMIT = 3
"""Lost-worker requeues of one command before it is failed as `lost`."""

DEFAULT_OOM_LIMIT = 2
"""Nodes on which the kernel may kill one command for want of memory (each time handed back,
not failed) before it fails as `oom`: two, so one overcommitted node does not fail it."""

DEFAULT_KEEP = 7 * 24 * 3600.0
"""Seconds an ended batch's records stay in Redis (then they expire; `forget` drops them now)."""
DEFAULT_SENTINEL_MASTER = "mymaster"
"""The master name a `sentinel://` broker asks the Sentinels for (Redis's own example name)."""

SENTINEL_PORT = 26379
"""Sentinel's port when a `sentinel://` URL gives none (as kombu and redis-sentinel use)."""

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
    oom_limit: int = DEFAULT_OOM_LIMIT
    keep: float = DEFAULT_KEEP
    # TLS to Redis (rediss://): certificates are verified unless tls_insecure is set
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_insecure: bool = False
    # message signing with Celery's `auth` serializer: only holders of a trusted key can queue
    sign_key: str | None = None
    sign_cert: str | None = None
    sign_store: str | None = None
    # high availability: a sentinel:// broker names Sentinels, which name the current master
    sentinel_master: str = DEFAULT_SENTINEL_MASTER
    sentinel_password: str | None = None
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
        if not self.broker.startswith(
            ("redis://", "rediss://", "redis+socket://", "unix://", "sentinel://")
        ):
            raise ConfigError(
                f"--broker / {ENV_PREFIX}BROKER: {mask_url(self.broker)!r} is not a Redis URL "
                "(redis://, rediss://, redis+socket:// or sentinel://)"
            )
        self._validate_urls()
        self._validate_sentinel()
        if self.visibility_timeout <= self.time_limit:
            raise ConfigError(
                f"{ENV_PREFIX}VISIBILITY_TIMEOUT ({self.visibility_timeout} s) must be larger than "
                f"the time limit ({self.time_limit} s), otherwise Redis hands a still-running "
                "command to a second worker"
            )
        if self.heartbeat <= 0:
            raise ConfigError(f"{ENV_PREFIX}HEARTBEAT ({self.heartbeat:g} s) must be positive")
        if self.lost_after < self.min_lost_after:
            raise ConfigError(
                f"{ENV_PREFIX}LOST_AFTER ({self.lost_after:g} s) is too short for "
                f"{ENV_PREFIX}HEARTBEAT {self.heartbeat:g} s: the smallest allowed is "
                f"{self.min_lost_after:g} s (a runner stops its command after LOST_AFTER - 2 x "
                f"HEARTBEAT without a renewal, which must hold {LEASE_SLACK_HEARTBEATS} renewal "
                "intervals)"
            )
        if self.keep <= 0:
            raise ConfigError(f"{ENV_PREFIX}KEEP ({self.keep:g} s) must be positive")
        if self.crash_limit < 1:
            raise ConfigError(f"{ENV_PREFIX}CRASH_LIMIT must be at least 1")
        if self.oom_limit < 1:
            raise ConfigError(f"{ENV_PREFIX}OOM_LIMIT must be at least 1")
        self._validate_tls()
        self._validate_signing()

    def _validate_urls(self) -> None:
        """A port that is a number, and no TLS setting in a URL: the --tls-* options are what
        Celery, kombu, Flower and our own redis-py client all receive, while a URL's query
        reaches only some of them (and overrides the options in redis-py)."""
        for where, url in (
            (f"--broker / {ENV_PREFIX}BROKER", self.broker),
            (f"--result-backend / {ENV_PREFIX}RESULT_BACKEND", self.result_backend),
        ):
            if not url:
                continue
            if url.startswith("sentinel://"):
                parse_sentinel_url(where, url)  # every part, not urlsplit's view of the first
                continue
            try:
                _ = urlsplit(url).port  # parsed on access: raises for 'notaport' or 99999
            except ValueError:
                raise ConfigError(
                    f"{where}: {mask_url(url)!r}: the port is not a number from 1 to 65535"
                ) from None
            if not self.tls_insecure:
                _refuse_tls_in_query(where, url)

    def _validate_sentinel(self) -> None:
        """A master name Sentinel can hold, and no TLS: kombu, Celery's result backend, Flower
        and redis-py each take TLS to Sentinel and to the master differently, so it is refused
        rather than half applied."""
        name = self.sentinel_master
        if not name or any(c.isspace() for c in name):
            raise ConfigError(
                f"--sentinel-master / {ENV_PREFIX}SENTINEL_MASTER: {name!r} is not a master name"
            )
        sentinel = [u for u in (self.broker, self.result_backend) if u and _is_sentinel(u)]
        if self.sentinel_password and not sentinel:
            raise ConfigError(
                f"--sentinel-password / {ENV_PREFIX}SENTINEL_PASSWORD: given, but the broker "
                f"{mask_url(self.broker)!r} is not a sentinel:// URL"
            )
        if sentinel and (self.tls_ca or self.tls_cert or self.tls_key or self.tls_insecure):
            raise ConfigError(
                f"--tls-* / {ENV_PREFIX}TLS_*: TLS is not supported with a sentinel:// broker; "
                "keep Sentinel and Redis on a private network, or use rediss:// without Sentinel"
            )

    def _validate_tls(self) -> None:
        tls_given = self.tls_ca or self.tls_cert or self.tls_key or self.tls_insecure
        if tls_given and not self.uses_tls:
            raise ConfigError(
                f"--tls-* / {ENV_PREFIX}TLS_*: given, but the broker {mask_url(self.broker)!r} "
                "is not a rediss:// URL"
            )
        if self.tls_key and not self.tls_cert:
            raise ConfigError(f"--tls-key / {ENV_PREFIX}TLS_KEY needs --tls-cert as well")
        for option, path in (
            ("tls-ca", self.tls_ca),
            ("tls-cert", self.tls_cert),
            ("tls-key", self.tls_key),
        ):
            _readable_file(option, path)

    def _validate_signing(self) -> None:
        given = {
            "sign-key": self.sign_key,
            "sign-cert": self.sign_cert,
            "sign-store": self.sign_store,
        }
        if any(given.values()) and not all(given.values()):
            missing = ", ".join(f"--{k}" for k, v in given.items() if not v)
            raise ConfigError(
                f"message signing needs --sign-key, --sign-cert and --sign-store; missing {missing}"
            )
        _readable_file("sign-key", self.sign_key)
        _readable_file("sign-cert", self.sign_cert)
        if self.sign_store and not os.path.isdir(self.sign_store):
            raise ConfigError(f"--sign-store {self.sign_store}: not a directory of certificates")

    @property
    def runner_margin(self) -> float:
        """Seconds a runner goes on without a renewal before it kills its command: it must be
        dead before the reaper (LOST_AFTER after the last renewal, a heartbeat late at most)
        can give the command to another node."""
        return self.lost_after - 2 * self.heartbeat

    @property
    def min_lost_after(self) -> float:
        """The smallest LOST_AFTER whose runner margin holds LEASE_SLACK_HEARTBEATS renewals."""
        return (2 + LEASE_SLACK_HEARTBEATS) * self.heartbeat

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
    def uses_tls(self) -> bool:
        return any(u.startswith("rediss://") for u in (self.broker, self.backend_url))

    @property
    def uses_sentinel(self) -> bool:
        """The broker is found through Redis Sentinel (and follows its failovers)."""
        return _is_sentinel(self.broker)

    @property
    def signing(self) -> bool:
        return self.sign_key is not None

    def ssl_options(self) -> dict[str, Any] | None:
        """redis-py's SSL arguments (also kombu's broker_use_ssl), or None without TLS.

        kombu silently skips verification for a bare rediss:// URL; here an unset CA means the
        system's CA bundle, and only tls_insecure turns verification off.
        """
        if not self.uses_tls:
            return None
        options: dict[str, Any] = {
            "ssl_cert_reqs": ssl.CERT_NONE if self.tls_insecure else ssl.CERT_REQUIRED,
            "ssl_check_hostname": not self.tls_insecure,
        }
        for key, value in (
            ("ssl_ca_certs", self.tls_ca),
            ("ssl_certfile", self.tls_cert),
            ("ssl_keyfile", self.tls_key),
        ):
            if value:
                options[key] = value
        return options

    @property
    def display_broker(self) -> str:
        """The broker URL as it may be printed: password masked."""
        return mask_url(self.broker)


@dataclass(frozen=True)
class SentinelURL:
    """A `sentinel://[USER:PASSWORD@]HOST:PORT[/DB][;sentinel://HOST:PORT...]` URL, read the
    way kombu and Celery read it: the Sentinels to ask, and from the first part the database
    and the *master's* credentials (a Sentinel's own password is --sentinel-password)."""

    sentinels: tuple[tuple[str, int], ...]
    db: int = 0
    username: str | None = None
    password: str | None = None


def _is_sentinel(url: str) -> bool:
    return url.startswith("sentinel://")


def parse_sentinel_url(where: str, url: str) -> SentinelURL:
    """The Sentinels, database and master credentials of `url`; ConfigError (one line, the
    password masked) for a part that is not `sentinel://HOST[:PORT][/DB]`."""
    sentinels: list[tuple[str, int]] = []
    first: Any = None
    for part in url.split(";"):
        shown = f"{where}: {mask_url(url)!r}"
        parsed = urlsplit(part.strip())
        try:
            port = parsed.port or SENTINEL_PORT
        except ValueError:
            raise ConfigError(f"{shown}: a port is not a number from 1 to 65535") from None
        if parsed.scheme != "sentinel" or not parsed.hostname:
            raise ConfigError(
                f"{shown}: each part must be sentinel://HOST:PORT (several joined by ';')"
            )
        if parsed.query:
            raise ConfigError(
                f"{shown}: URL parameters are not read with sentinel://; the master name is "
                f"--sentinel-master, a Sentinel's password --sentinel-password"
            )
        sentinels.append((parsed.hostname, port))
        first = first or parsed
    db = (first.path or "/0").strip("/") or "0"
    if not db.isdigit():
        raise ConfigError(f"{where}: {mask_url(url)!r}: the database {db!r} is not a number")
    return SentinelURL(
        tuple(sentinels),
        int(db),
        unquote(first.username) if first.username else None,
        unquote(first.password) if first.password else None,
    )


_TLS_FILE_PARAMETERS = {
    "ssl_ca_certs": "--tls-ca",
    "ssl_ca_path": "--tls-ca",
    "ssl_ca_data": "--tls-ca",
    "ssl_certfile": "--tls-cert",
    "ssl_keyfile": "--tls-key",
}
"""URL query parameters naming certificates, and the option to give instead."""

_DEFAULT_SPELLINGS = {
    "ssl_cert_reqs": ("required", "cert_required"),
    "ssl_check_hostname": ("1", "t", "true", "y", "yes", "on"),
}
"""Values that only restate what the options already enforce (Celery's documentation puts
`ssl_cert_reqs=required` in rediss:// URLs); any other value turns a check off."""

_TURNS_OFF = {"ssl_cert_reqs": "certificate checks", "ssl_check_hostname": "host name checks"}


def _refuse_tls_in_query(where: str, url: str) -> None:
    """ConfigError for the first ssl_* query parameter of `url` other than a restated default.

    Names are compared case-insensitively and after percent-decoding, every value of a
    repeated parameter counts: a check is off as soon as any client reads it that way."""
    for raw_name, raw_value in parse_qsl(urlsplit(url).query, keep_blank_values=True):
        name, value = raw_name.strip().lower(), raw_value.strip().lower()
        if not name.startswith("ssl_"):
            continue
        if value in _DEFAULT_SPELLINGS.get(name, ()):
            continue
        shown = f"{where}: {mask_url(url)!r}"
        if name in _TURNS_OFF:
            raise ConfigError(
                f"{shown} turns {_TURNS_OFF[name]} off: remove {raw_name} from the URL, "
                "or give --tls-insecure (testing only)"
            )
        if name in _TLS_FILE_PARAMETERS:
            raise ConfigError(
                f"{shown} sets {raw_name} in the URL, which Celery, kombu and Flower do not all "
                f"read: remove it from the URL and give {_TLS_FILE_PARAMETERS[name]} instead"
            )
        raise ConfigError(
            f"{shown} sets {raw_name} in the URL, which Celery, kombu and Flower do not all "
            "read: remove it; TLS is set by --tls-ca, --tls-cert and --tls-key, or turned off "
            "by --tls-insecure (testing only)"
        )


def _readable_file(option: str, path: str | None) -> None:
    if path and not os.access(path, os.R_OK):
        raise ConfigError(f"--{option} {path}: no such readable file")


def _convert(var: str, raw: str, kind: Any) -> Any:
    kind = str(kind)
    if kind == "bool":
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{var}={raw!r} is not a yes/no value")
    try:
        if "int" in kind:
            return int(raw)
        if "float" in kind:
            return float(raw)
    except ValueError:
        raise ConfigError(f"{var}={raw!r} is not a number") from None
    return raw


def mask_url(url: str) -> str:
    """Hide the passwords of a URL: redis://user:secret@host -> redis://user:***@host, and
    redis+socket:///r.sock?password=secret -> ?password=***.

    Works on the text (nothing is parsed into numbers), so a URL with a bad port is masked too
    and the rest of the URL is shown exactly as given; each part of a `sentinel://a;sentinel://b`
    list is masked on its own."""
    if _is_sentinel(url) and ";" in url:
        return ";".join(mask_url(part) for part in url.split(";"))
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    netloc, tail = rest[:end], rest[end:]
    userinfo, at, hostport = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.split(':', 1)[0]}:***@{hostport}"
    path, question, query_fragment = tail.partition("?")
    if question:
        query, hash_, fragment = query_fragment.partition("#")
        pairs = []
        for pair in query.split("&"):
            name, eq, value = pair.partition("=")
            if eq and value and unquote(name).strip().lower() == "password":
                pair = f"{name}=***"
            pairs.append(pair)
        tail = f"{path}?{'&'.join(pairs)}{hash_}{fragment}"
    return f"{scheme}://{netloc}{tail}"


def cpu_count() -> int:
    """CPUs this process may use (affinity-aware), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)
