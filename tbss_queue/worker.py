"""Starting a worker node: a Celery worker with tbss-queue's app, for one machine."""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import logging
import os
import re
import signal
import socket
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import psutil
import redis
from celery.exceptions import SecurityWarning
from celery.signals import worker_ready, worker_shutting_down
from celery.worker import state as worker_state
from celery.worker.consumer import consumer as celery_consumer

from tbss_queue.config import Settings, cpu_count
from tbss_queue.doctor import fsl_version
from tbss_queue.errors import ConfigError
from tbss_queue.execution import owner as owner_policy
from tbss_queue.execution.health import Health
from tbss_queue.execution.policy import Policy
from tbss_queue.execution.resources import budget_facts, node_ledger
from tbss_queue.execution.tasks import NodeRules, refuse_message, register
from tbss_queue.paths import PathMap
from tbss_queue.queue.app import make_app
from tbss_queue.queue.batches import BatchStore
from tbss_queue.queue.broker import connect
from tbss_queue.queue.persistence import eviction_warning, persistence_warning
from tbss_queue.queue.publish import REF_HEADER
from tbss_queue.queue.recovery import Reaper
from tbss_queue.version import __version__

log = logging.getLogger(__name__)

DEFAULT_GRACE = 600.0
"""Seconds a SIGTERM-ed worker lets running commands finish before handing them back: longer
than a typical registration (3-5 min). Service managers must wait longer than this."""

SHUTDOWN_SLACK = 15.0
"""Seconds a worker may take to stop once its commands are cancelled, before it exits anyway.
Celery retries its heartbeat event forever when Redis is gone, so a node told to stop would
hang until SIGKILL; whatever it did not hand back is recovered from Redis by the other nodes."""


@dataclass(frozen=True)
class WorkerOptions:
    """How this node consumes (as opposed to what the queue is: `Settings`)."""

    concurrency: int | None = None
    name: str | None = None
    loglevel: str = "INFO"
    path_map: PathMap = field(default_factory=PathMap)
    grace: float = DEFAULT_GRACE
    stop_after: float | None = None  # seconds from start; then take no new command
    policy: Policy = field(default_factory=Policy)
    max_time_limit: float | None = None  # caps each batch's own time limit on this node
    pass_env: tuple[str, ...] = ()  # variables passed on to commands beyond the allowlist
    idle_exit: float | None = None  # seconds with no command; then stop as at stop_after
    owner: owner_policy.OwnerPolicy = field(default_factory=owner_policy.OwnerPolicy)
    mem: int | None = None  # bytes its commands may hold together; None: memory.default_budget

    @property
    def nodename(self) -> str:
        """Celery's name@host form; a bare name gets this host appended."""
        name = self.name or "tbss"
        return name if "@" in name else f"{name}@{socket.gethostname()}"


def parse_duration(text: str, option: str = "--stop-after") -> float:
    """'90', '90s', '10m', '2h', '1h30m', '1d' -> seconds."""
    parts = re.fullmatch(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s?)?", text.strip())
    if not text.strip() or parts is None:
        raise ConfigError(f"{option} {text!r}: expected a duration like 90s, 10m, 2h or 1h30m")
    d, h, m, s = (float(p) if p else 0.0 for p in parts.groups())
    return d * 86400 + h * 3600 + m * 60 + s


def seconds_until(text: str, now: dt.datetime | None = None) -> float:
    """'HH:MM' (today, or tomorrow if past) or an ISO date-time -> seconds from now."""
    now = now or dt.datetime.now()
    try:
        if re.fullmatch(r"\d{1,2}:\d{2}", text):
            hour, minute = map(int, text.split(":"))
            when = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
            if when <= now:
                when += dt.timedelta(days=1)
        else:
            when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"--until {text!r}: expected HH:MM or YYYY-MM-DDTHH:MM") from None
    return max(0.0, (when - now).total_seconds())


def stop_after_seconds(stop_after: str | None, until: str | None) -> float | None:
    """--stop-after / --until as seconds from now (None: run until stopped)."""
    if stop_after and until:
        raise ConfigError("give --stop-after or --until, not both")
    if stop_after:
        return parse_duration(stop_after)
    return seconds_until(until) if until else None


def node_facts(options: WorkerOptions) -> dict[str, Any]:
    """What this node runs with; `status` warns when one batch's nodes differ in FSL."""
    fsldir = os.environ.get("FSLDIR")
    return {
        "host": socket.gethostname(),
        "fsldir": fsldir,
        "fsl_version": fsl_version(fsldir) if fsldir else None,
        "cpus": cpu_count(),
        "concurrency": options.concurrency or cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
        **budget_facts(options),
        "tbss_queue": __version__,
        "started": time.time(),
    }


def run_worker(settings: Settings, options: WorkerOptions) -> None:
    """Run a worker node in this process until it is stopped.

    SIGTERM (or a first Ctrl+C): take no new command, exit as soon as running ones finish, or
    after `grace` seconds kill them and hand their tasks back to the queue (not failed). With
    `stop_after`, the node stops taking commands after that long and exits 0 once the running
    ones are done.
    """
    connect(settings)  # fail fast, with a one-line error, if the broker is wrong
    app = make_app(settings)
    rules = NodeRules(options.path_map, options.policy, options.max_time_limit, options.pass_env)
    rules = replace(rules, ledger=node_ledger(options))  # before the pool forks: shared
    register(app, settings, rules)
    app.conf.worker_consumer = f"{__name__}:Consumer"
    app.Worker = _with_our_banner(app.Worker, options.policy, options.owner)
    _warn_if_root()
    if options.policy.allow_any:
        log.warning("--allow-any: this worker runs ANY command that reaches the queue")
    store = BatchStore(connect(settings, check=False))
    with contextlib.suppress(redis.RedisError):  # first uses load them otherwise
        store.load_scripts()
    Consumer.refuse = functools.partial(refuse_message, store, settings, options.nodename)
    for warning in (persistence_warning(store.r), eviction_warning(store.r)):
        if warning:
            log.warning(warning)
    reaper = Reaper(app, settings, store)
    health = Health(app, settings, store, options.nodename)
    # a restarted node starts afresh: its configuration may be what was fixed
    if store.release_node(options.nodename):
        log.warning("left quarantine at start: taking commands again")
    # the owner policy's word to the pool processes: shared memory mapped before they fork
    shared = owner_policy.share(options.owner)

    def on_ready(sender: Any = None, **_: Any) -> None:
        health.consumer = sender
        health.beat()
        health.start()
        reaper.start()
        reaper.store.announce(options.nodename, node_facts(options))
        if options.stop_after is not None:
            threading.Thread(
                target=_drain,
                args=(sender, settings.queue, options.stop_after, health),
                name="tbss-queue-stop-after",
                daemon=True,
            ).start()
        if shared is not None:
            switch = owner_policy.consumer_switch(sender, settings.queue)
            threading.Thread(
                target=owner_policy.watch,
                args=(options.owner, options.grace, shared, switch),
                kwargs={
                    "publish": functools.partial(store.paused, options.nodename),
                    "stop": threading.Event(),  # never set: it lives as long as the node
                },
                name="tbss-queue-owner",
                daemon=True,
            ).start()
        if options.idle_exit is not None:
            threading.Thread(
                target=_idle_exit,
                args=(sender, settings.queue, options.idle_exit, health),
                name="tbss-queue-idle-exit",
                daemon=True,
            ).start()

    worker_ready.connect(on_ready, weak=False)
    armed: set[str] = set()

    def on_shutting_down(how: str = "", **_: Any) -> None:
        # Celery's warm shutdown (SIGTERM) waits for running commands however long they take;
        # its soft shutdown would sleep the whole grace period even when they end sooner. So:
        # warm shutdown, and after `grace` our own SIGQUIT, Celery's cold shutdown, which
        # cancels the commands (attempt.py hands them back).
        reaper.stopped.set()
        health.stop()
        if how in armed:  # a second SIGTERM changes nothing
            return
        armed.add(how)
        after, then = (options.grace, _hand_back) if how == "Warm" else (SHUTDOWN_SLACK, _exit)
        threading.Thread(
            target=_later, args=(after, then), name="tbss-queue-shutdown", daemon=True
        ).start()

    worker_shutting_down.connect(on_shutting_down, weak=False)
    argv = [
        "worker",
        f"--hostname={options.nodename}",
        f"--concurrency={options.concurrency or cpu_count()}",
        f"--queues={settings.queue}",
        f"--loglevel={options.loglevel}",
        "--without-mingle",
        "--without-gossip",
    ]
    app.worker_main(argv=argv)


def _with_our_banner(base: Any, policy: Policy, owner: owner_policy.OwnerPolicy) -> Any:
    """Celery's worker, whose banner says what task events are here (off until a Flower asks,
    app.py, not "enable -E") and which files this node trusts."""

    class Worker(base):
        def startup_info(self, artlines: bool = True) -> str:
            info = str(super().startup_info(artlines)).replace(
                "OFF (enable -E to monitor tasks in this worker)",
                "off until a Flower asks for them (tbss-queue flower)",
            )
            lines = owner_policy.describe(owner)
            return info + _policy_lines(policy) + "".join(f"  .> {ln}\n" for ln in lines)

    return Worker


def _policy_lines(policy: Policy) -> str:
    """The banner's account of what this node runs: the very files --allow made it trust."""
    if policy.allow_any:
        return "\n[policy]\n  .> --allow-any: runs ANY command that reaches the queue\n"
    lines = ["", "[policy]", "  .> FSL's tools under $FSLDIR"]
    lines += [f"  .> --allow: trusts {t}" for t in policy.trusted]
    lines += [f"  .> --root {r}" for r in policy.roots]
    return "\n".join(lines) + "\n"


def _warn_if_root() -> None:
    """One line instead of Celery's paragraph (it fits JSON-only workers too)."""
    warnings.filterwarnings("ignore", category=SecurityWarning)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        log.warning(
            "running as root: every command runs as root too; run workers as an unprivileged "
            "user (the files in worker/ do)"
        )


def _later(seconds: float, then: Callable[[float], None]) -> None:
    time.sleep(seconds)
    then(seconds)


def _hand_back(grace: float) -> None:
    """The grace period is over: Celery's cold shutdown cancels what still runs."""
    if not worker_state.active_requests:  # nothing runs (a drained node): warm shutdown ends
        return
    log.warning("grace period of %.0f s over: handing running commands back to the queue", grace)
    os.kill(os.getpid(), signal.SIGQUIT)


def _exit(waited: float) -> None:
    """Still shutting down `waited` s after the commands were cancelled: exit with status 1.
    Pool processes and the commands they run die with this process (parent-death signals)."""
    log.error("shutdown still not finished after %.0f s (is Redis reachable?): exiting now", waited)
    logging.shutdown()
    os._exit(1)


class Consumer(celery_consumer.Consumer):
    """Celery's consumer, except that a task message it cannot decode (unsigned, or signed by
    a key this worker does not trust) also fails its command as `refused`, instead of leaving
    it queued for ever with nothing to say why."""

    refuse: Callable[[str, str, str], None] | None = None  # (batch, command, why); run_worker

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        super().on_decode_error(message, exc)  # signed by a key this worker does not trust
        self._refuse(message, exc)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        super().on_invalid_task(body, message, exc)  # not signed at all
        self._refuse(message, exc)

    @staticmethod
    def _refuse(message: Any, exc: Exception) -> None:
        ref = (message.headers or {}).get(REF_HEADER)
        if Consumer.refuse is not None and isinstance(ref, str) and "|" in ref:
            batch_id, task_id = ref.split("|", 1)
            try:
                Consumer.refuse(batch_id, task_id, f"message not signed by a trusted key: {exc}")
            except Exception:  # the broker may be away: the command then stays queued
                log.warning("could not record the refusal of %s", ref, exc_info=True)


def _drain(
    consumer: Any, queue: str, after: float, health: Health, why: str = "stop-after reached"
) -> None:
    """After `after` seconds: stop consuming, wait for running commands, then shut down."""
    time.sleep(after)
    if health.draining:  # the other of stop-after and idle-exit came first
        return
    health.draining = True
    log.warning("%s: taking no new commands; exiting when running ones end", why)
    consumer.cancel_task_queue(queue)
    while worker_state.active_requests or worker_state.reserved_requests:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


def _idle_exit(consumer: Any, queue: str, idle: float, health: Health) -> None:
    """Once no command has run nor waited on this node for `idle` seconds, stop as `_drain`
    does (a pilot job thus ends and frees its allocation when the queue has emptied)."""
    last_busy = time.monotonic()
    while not health.draining:
        if worker_state.active_requests or worker_state.reserved_requests:
            last_busy = time.monotonic()
        elif time.monotonic() - last_busy >= idle:
            _drain(consumer, queue, 0.0, health, f"idle for {idle:.0f} s")
            return
        time.sleep(min(1.0, idle / 4))
