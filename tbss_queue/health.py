"""A worker node's health: it says it is up, and keeps out of the queue while quarantined."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import Any

import redis
from kombu.exceptions import OperationalError

from .batches import BatchStore
from .config import Settings
from .preflight import CAUSE_LATE

log = logging.getLogger(__name__)

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


class Health(threading.Thread):
    """Says every heartbeat that this node is up; clears what it found it cannot run once the
    missing path exists (a study mounted since: lua/node_fault.lua records such faults, and the
    node takes every other command meanwhile); and keeps it out of the queue while it is
    quarantined (its runners kept renewing late), until `tbss-queue nodes resume NAME` or a
    restart."""

    def __init__(self, app: Any, settings: Settings, store: BatchStore, node: str) -> None:
        super().__init__(name="tbss-queue-health", daemon=True)
        self.app, self.settings, self.store, self.node = app, settings, store, node
        self.consumer: Any = None
        self.stopped = threading.Event()
        self.draining = False
        self.was_quarantined = False  # at the last beat; a stopped consumer means a release
        # a beat under way when the node is told to stop must not undo its stop mark
        self._beating = threading.RLock()

    def stop(self) -> None:
        """Stop beating, and say at once that this node takes no more commands."""
        self.stopped.set()
        with self._beating, contextlib.suppress(Exception):
            self.store.gone(self.node)

    def run(self) -> None:
        while not self.stopped.wait(self.settings.heartbeat):
            try:
                self.beat()
            except Exception as exc:  # a broker outage must not kill the worker; try again
                BROKER.failed("node health check", exc)
            else:
                BROKER.answered()

    def beat(self) -> None:
        with self._beating:
            if self.stopped.is_set():
                return
            self.store.alive(self.node, stopping=self.draining)
        for scope, fault in self.store.faults(self.node).get(self.node, {}).items():
            path = fault.get("path")
            if path and os.path.exists(path):
                self.store.clear_fault(self.node, scope)
                log.warning("can run commands in %s again: it exists now", path)
        why = self.store.quarantined(self.node).get(self.node)
        path = why.get("path") if why else None
        if why and path and os.path.exists(path):
            self.store.release_node(self.node)
            log.warning("left quarantine: %s exists now", path)
            why = None
        if why and why.get("cause") != CAUSE_LATE and not self.others_take_commands():
            # the last node standing: commands it can't start should fail with their reasons
            # (every node taking commands refused them) rather than wait for ever
            self.store.release_node(self.node)
            log.warning("left quarantine: no other node is taking commands")
            why = None
        consuming = self.consuming()
        if why and consuming:
            log.error("quarantined, taking no commands: %s", why.get("message"))
            self.app.control.cancel_consumer(self.settings.queue, destination=[self.node])
        elif not why and not consuming and not self.draining:
            if self.was_quarantined:
                log.warning("out of quarantine: taking commands again")
            else:  # e.g. met between a broker reconnect and the consumer's restart
                log.info("not consuming from %s: consuming again", self.settings.queue)
            self.app.control.add_consumer(self.settings.queue, destination=[self.node])
        self.was_quarantined = why is not None

    def others_take_commands(self) -> bool:
        quarantined = self.store.quarantined()
        live = self.store.live_nodes(self.settings.lost_after)
        return any(n != self.node and n not in quarantined for n in live)

    def consuming(self) -> bool:
        """Whether this node takes messages from the queue now (a task may have stopped it)."""
        tasks = getattr(self.consumer, "task_consumer", None)
        return tasks is None or bool(tasks.consuming_from(self.settings.queue))
