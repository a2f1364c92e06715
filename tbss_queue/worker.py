"""Starting a worker node: a Celery worker with tbss-queue's app, for one machine."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from celery.signals import worker_ready, worker_shutting_down

from .app import make_app
from .batches import BatchStore
from .broker import connect
from .config import Settings, cpu_count
from .paths import PathMap
from .recovery import Reaper
from .tasks import register


@dataclass(frozen=True)
class WorkerOptions:
    """How this node consumes (as opposed to what the queue is: `Settings`)."""

    concurrency: int | None = None
    name: str | None = None
    loglevel: str = "INFO"
    path_map: PathMap = field(default_factory=PathMap)

    @property
    def nodename(self) -> str:
        """Celery's name@host form; a bare name gets this host appended."""
        name = self.name or "tbss"
        return name if "@" in name else f"{name}@{socket.gethostname()}"


def run_worker(settings: Settings, options: WorkerOptions) -> None:
    """Run a worker node in this process until it is stopped (SIGTERM: finish running commands)."""
    connect(settings)  # fail fast, with a one-line error, if the broker is wrong
    app = make_app(settings)
    register(app, settings, options.path_map)
    reaper = Reaper(app, settings, BatchStore(connect(settings, check=False)))
    worker_ready.connect(lambda **_: reaper.start(), weak=False)
    worker_shutting_down.connect(lambda **_: reaper.stopped.set(), weak=False)
    argv = [
        "worker",
        f"--hostname={options.nodename}",
        f"--concurrency={options.concurrency or cpu_count()}",
        f"--queues={settings.queue}",
        f"--loglevel={options.loglevel}",
        "--task-events",
        "--without-mingle",
        "--without-gossip",
    ]
    app.worker_main(argv=argv)
