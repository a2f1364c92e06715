"""SIGTERM during an attempt: noted, not raised, so the attempt ends in good order."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator

from tbss_queue.execution.runner import Stop


class Interrupts:
    """SIGTERM while a command is handled here (the worker's cold shutdown, Celery's hard time
    limit) is noted, not raised: a running command is stopped and handed back, a finished one's
    record lands first; then the pool process exits as it was told to."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # when this attempt began: Celery's hard limit counts from about here, START_BUDGET too
        self.began = time.monotonic()

    def _note(self, signum: int, frame: object) -> None:
        self.signum = signum
        with contextlib.suppress(OSError):
            os.write(self.write_fd, b"!")

    def stop(self) -> Stop | None:
        return Stop("the worker is stopping") if self.signum is not None else None

    @contextlib.contextmanager
    def installed(self) -> Iterator[Interrupts]:
        previous = signal.signal(signal.SIGTERM, self._note)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, previous)
            os.close(self.read_fd)
            os.close(self.write_fd)
            if self.signum is not None:
                raise SystemExit(128 + self.signum)
