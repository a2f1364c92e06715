"""Cancel nudges: a running command stops moments after `cancel`, not at its next renewal.

The lease stays the authority. A nudge (a Redis pub/sub message naming the batch) only makes a
runner of that batch renew its lease now, and the renewal's answer, `cancelled`, is what stops
the command. A nudge that is missed (a dropped connection, a runner not yet subscribed) changes
nothing but the delay: the next renewal, within a heartbeat, stops the command all the same.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import redis

from tbss_queue.queue.keys import CANCEL_CHANNEL

log = logging.getLogger(__name__)


class Nudges:
    """One subscription per pool process, shared by the commands it runs one after another:
    no Redis round trip per command. A nudge for a batch wakes the runner of that batch by a
    byte on its wake pipe (the one its SIGTERM handler writes to)."""

    def __init__(self, client: redis.Redis) -> None:
        self.pid = os.getpid()
        self._lock = threading.Lock()
        self._watching: dict[str, int] = {}  # batch id -> the fd that wakes its runner
        self._pubsub = client.pubsub(ignore_subscribe_messages=True)
        self._pubsub.subscribe(**{CANCEL_CHANNEL: self._heard})
        self._thread = self._pubsub.run_in_thread(
            sleep_time=1.0, daemon=True, exception_handler=self._trouble
        )

    def _heard(self, message: dict[str, Any]) -> None:
        with self._lock:
            fd = self._watching.get(str(message.get("data")))
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.write(fd, b"n")

    def _trouble(self, exc: BaseException, pubsub: Any, thread: Any) -> None:
        # redis-py reconnects and subscribes again at the next read; until then the renewals
        # do the nudges' work
        log.debug("cancel nudges interrupted (%s); the lease renewals stand in", exc)
        time.sleep(1.0)

    @contextlib.contextmanager
    def watching(self, batch_id: str, wake_fd: int) -> Iterator[None]:
        """While inside, a cancel of `batch_id` writes a byte to `wake_fd`."""
        with self._lock:
            self._watching[batch_id] = wake_fd
        try:
            yield
        finally:
            with self._lock:  # never a write to a descriptor closed (and reused) after this
                self._watching.pop(batch_id, None)


_NUDGES: Nudges | None = None


def nudges(client: redis.Redis) -> Nudges | None:
    """This process's subscription, made at its first command (again after a fork); None if
    Redis can't be reached now: the renewals alone stop a cancelled command then."""
    global _NUDGES
    if _NUDGES is None or _NUDGES.pid != os.getpid():
        try:
            _NUDGES = Nudges(client)
        except redis.RedisError as exc:
            log.warning("no cancel nudges for now (%s): renewals stop cancelled commands", exc)
            return None
    return _NUDGES


@contextlib.contextmanager
def watching(client: redis.Redis, batch_id: str, wake_fd: int) -> Iterator[None]:
    """Wake `wake_fd` on a cancel of `batch_id` while inside, if nudges can be had."""
    subscription = nudges(client)
    if subscription is None:
        yield
        return
    with subscription.watching(batch_id, wake_fd):
        yield
