"""A worker node's health: it says it is up, and keeps out of the queue while quarantined."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Any

from tbss_queue.config import Settings
from tbss_queue.execution import pausing
from tbss_queue.execution.preflight import CAUSE_LATE
from tbss_queue.queue.batches import BatchStore
from tbss_queue.queue.broker import BROKER

log = logging.getLogger(__name__)


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
        elif not why and not consuming and not self.draining and not pausing.held():
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
