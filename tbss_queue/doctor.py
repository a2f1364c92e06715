"""`tbss-queue doctor`: is this machine ready to submit or work? Each check says what to do."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
import redis

from tbss_queue.config import Settings, cpu_count
from tbss_queue.errors import TbssQueueError
from tbss_queue.queue.batches import BatchStore
from tbss_queue.queue.broker import connect, sentinels_of
from tbss_queue.queue.persistence import FIX as PERSISTENCE_FIX
from tbss_queue.queue.persistence import eviction_warning, persistence

GB_PER_FNIRT = 2.0
"""Memory to plan per registration. FNIRT on 1 mm FA is commonly quoted at 1-2 GB per process;
we have not measured it (the demo's stand-in is not FSL): check one registration with
`/usr/bin/time -v fsl_reg ...` on your data and adjust --concurrency."""

MAX_SKEW = 5.0
"""Seconds of clock difference to Redis that start to distort heartbeats, ETAs and timelines."""

MIN_FREE_GB = 1.0

FAILOVER_ALLOWANCE = 5.0
"""Seconds a Sentinel failover takes beyond down-after-milliseconds (election, promotion,
clients finding the new master): 1.2 s measured on loopback, more across a network."""


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fsl_version(fsldir: str) -> str | None:
    """FSL's version from $FSLDIR/etc/fslversion, as FSL itself records it."""
    try:
        return (Path(fsldir) / "etc" / "fslversion").read_text().split(":")[0].strip() or None
    except OSError:
        return None


def check_broker(settings: Settings) -> list[Check]:
    try:
        client = connect(settings)
    except TbssQueueError as exc:
        return [
            Check(
                "broker",
                False,
                str(exc),
                "check --broker / TBSS_QUEUE_BROKER: host, port, password, firewall",
            )
        ]
    info = client.info("server")
    version = f"redis {info.get('redis_version')}"
    checks = [Check("broker", True, f"{settings.display_broker} answers ({version})")]
    if settings.uses_sentinel:
        checks = check_sentinel(settings, client, version)
    seconds, micros = client.time()
    skew = time.time() - (seconds + micros / 1e6)
    checks.append(
        Check(
            "clock",
            abs(skew) <= MAX_SKEW,
            f"{skew:+.2f} s against the broker's clock",
            "" if abs(skew) <= MAX_SKEW else "synchronise clocks (chrony/ntpd)",
        )
    )
    checks.append(check_persistence(client))
    checks.append(check_freeing(client))
    checks.append(check_eviction(client))
    for node, why in sorted(BatchStore(client).quarantined().items()):
        checks.append(
            Check(
                f"node {node}",
                False,
                f"quarantined, takes no commands: {why.get('message')}",
                f"fix that node, then: tbss-queue nodes resume {node}",
            )
        )
    for node, faults in sorted(BatchStore(client).faults().items()):
        for fault in faults.values():
            checks.append(
                Check(
                    f"node {node}",
                    True,  # it takes every other command: a warning, not a failure
                    f"cannot run some commands, takes the others: {fault.get('message')}",
                    "mount what is missing there (it notices by itself), or give that node a "
                    "--path-map or --allow",
                )
            )
    return checks


def _text(value: object) -> str:
    """A Sentinel's host or port as text: redis-py gives bytes or str, by protocol."""
    return value.decode() if isinstance(value, bytes) else str(value)


def check_sentinel(settings: Settings, client: redis.Redis, version: str) -> list[Check]:
    """The master the Sentinels name, and its replicas: without one, nothing can be promoted
    and the master's machine is again a single point of failure."""
    manager = sentinels_of(client)
    name = settings.sentinel_master
    host, port = map(_text, manager.discover_master(name))
    replicas = [":".join(map(_text, at)) for at in manager.discover_slaves(name)]
    broker = Check(
        "broker",
        True,
        f"{settings.display_broker} answers: master {name} at {host}:{port} ({version})",
    )
    if replicas:
        checks = [broker, Check("replicas", True, ", ".join(sorted(replicas)))]
    else:
        checks = [
            broker,
            Check(
                "replicas",
                True,
                f"none: Sentinel has no replica of {name} to promote, so losing the master "
                "stops the queue",
                f"start a replica: redis-server --replicaof {host} {port} --masterauth PASSWORD",
            ),
        ]
    return [*checks, check_failover_time(settings, manager)]


def check_failover_time(settings: Settings, manager: Any) -> Check:
    """A failover must end before running commands give up on their leases."""
    name = settings.sentinel_master
    try:
        down_after = float(manager.sentinels[0].sentinel_master(name)["down-after-milliseconds"])
    except (redis.RedisError, KeyError, ValueError, TypeError) as exc:
        return Check("failover", True, f"cannot read Sentinel's down-after-milliseconds: {exc}")
    expected = down_after / 1000 + FAILOVER_ALLOWANCE
    budget = settings.runner_margin
    detail = (
        f"Sentinel calls the master down after {down_after / 1000:g} s: a failover takes about "
        f"{expected:g} s; running commands wait {budget:g} s for it"
    )
    if expected < budget:
        return Check("failover", True, detail)
    return Check(
        "failover",
        False,
        detail,
        f"sentinel set {name} down-after-milliseconds {int((budget - FAILOVER_ALLOWANCE) * 500)}"
        " on every Sentinel, or raise TBSS_QUEUE_LOST_AFTER on every node",
    )


def check_persistence(client: redis.Redis) -> Check:
    """Does the broker keep queued commands across a restart (AOF or RDB)?"""
    try:
        state = persistence(client)
    except redis.RedisError as exc:
        return Check(
            "persistence",
            False,
            f"cannot ask the broker: {exc}",
            "run doctor again once it answers",
        )
    if state.durable is False:
        return Check(
            "persistence",
            False,
            "no AOF, no RDB: the broker keeps its data in memory only, a Redis restart loses "
            "every queued command and batch",
            PERSISTENCE_FIX,
        )
    if state.durable is None:
        return Check(
            "persistence",
            True,
            f"{state.describe()}: cannot tell whether a Redis restart keeps the queue; "
            "make sure the service persists its data",
        )
    return Check("persistence", True, state.describe())


def check_eviction(client: redis.Redis) -> Check:
    """Only `noeviction` keeps every lease and record whatever the memory: see eviction_warning."""
    warning = eviction_warning(client)
    if warning is not None:
        return Check(
            "eviction", False, warning.split("; set ")[0], "set maxmemory-policy noeviction"
        )
    return Check("eviction", True, "maxmemory-policy noeviction: no lease or record is evicted")


def check_freeing(client: redis.Redis) -> Check:
    """Does the broker free an ended batch's records without stopping? A million commands'
    hashes freed in the foreground when they expire held every worker up for 0.4-0.8 s."""
    try:
        lazy = client.config_get("lazyfree-lazy-expire").get("lazyfree-lazy-expire")
        malloc = str(client.info("memory").get("mem_allocator", "?"))
    except redis.RedisError as exc:  # CONFIG may be disabled on a managed Redis
        return Check("freeing", True, f"cannot ask the broker: {exc}")
    if lazy == "no":
        return Check(
            "freeing",
            False,
            "lazyfree-lazy-expire no: when an ended batch's records expire, Redis frees them "
            "while every worker waits (0.4-0.8 s per million commands)",
            "set lazyfree-lazy-expire yes (deploy/redis.conf does)",
        )
    detail = f"expired records freed in the background ({malloc})"
    if malloc.startswith("libc"):
        detail += (
            ": with libc malloc the background freeing holds up commands (up to 1 s measured "
            "at a million commands); a jemalloc build (Debian's redis-server, the redis image) "
            "does not"
        )
    return Check("freeing", True, detail)


def check_fsl(env: dict[str, str]) -> list[Check]:
    fsldir = env.get("FSLDIR")
    if not fsldir:
        return [
            Check(
                "FSL",
                False,
                "FSLDIR is not set",
                "install FSL, then `export FSLDIR=...; . $FSLDIR/etc/fslconf/fsl.sh`",
            )
        ]
    fsl_reg = Path(fsldir) / "bin" / "fsl_reg"
    if not os.access(fsl_reg, os.X_OK):
        return [
            Check(
                "FSL",
                False,
                f"{fsl_reg} not found or not executable",
                "FSLDIR must point at an FSL installation with the TBSS scripts",
            )
        ]
    version = fsl_version(fsldir) or "version unknown"
    return [Check("FSL", True, f"{fsl_reg} ({version})")]


def check_study(study: Path) -> list[Check]:
    if not study.is_dir():
        return [
            Check(
                "study",
                False,
                f"{study} is not a directory here",
                "mount the study at the same path on every machine",
            )
        ]
    try:
        with tempfile.NamedTemporaryFile(dir=study, prefix=".tbss-queue-doctor-"):
            pass
    except OSError as exc:
        return [
            Check(
                "study",
                False,
                f"{study} is not writable: {exc.strerror}",
                "workers must write registration outputs there: fix owner/permissions",
            )
        ]
    free = shutil.disk_usage(study).free / 1e9
    return [
        Check("study", True, f"{study} readable and writable"),
        Check(
            "disk",
            free >= MIN_FREE_GB,
            f"{free:.1f} GB free on {study}",
            "" if free >= MIN_FREE_GB else "free space: every registration writes files",
        ),
    ]


def check_machine() -> list[Check]:
    cpus = cpu_count()
    memory = psutil.virtual_memory().total / 1e9
    suggested = max(1, min(cpus, int(memory // GB_PER_FNIRT)))
    return [
        Check(
            "machine",
            True,
            f"{cpus} CPUs, {memory:.1f} GB memory: suggested --concurrency {suggested} "
            f"(one per CPU, {GB_PER_FNIRT:g} GB each; a rule of thumb, not measured)",
        )
    ]


def diagnose(
    settings: Settings,
    study: str | os.PathLike[str] | None = None,
    env: dict[str, str] | None = None,
) -> list[Check]:
    """Every check, in the order a person fixes them."""
    env = dict(os.environ) if env is None else env
    checks = check_broker(settings) + check_fsl(env)
    if study is not None:
        checks += check_study(Path(study))
    return checks + check_machine()
