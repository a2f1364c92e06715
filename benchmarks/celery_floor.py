"""The least a command can cost when it is one Celery task: tbss-queue's own Celery app
(`tbss_queue.queue.app.make_app`: acks_late, prefetch 1 per slot, JSON, no results, no task
events) with one task that only runs the line, and nothing of tbss-queue's around it (no
claim, lease, record, guard, log files or policy).

Shown beside the peers in `benchmarks.run` (never the best peer of a ratio): the gap between
it and tbss-queue is what tbss-queue's guarantees cost; the gap between it and HyperQueue is
what one Celery message per command costs. Two pools: prefork, as tbss-queue's worker runs,
and one solo-pool consumer per slot (the task runs in the consumer's own process).

Worker:  celery -A benchmarks.celery_floor worker -c 2 --without-mingle --without-gossip
Each finished task appends one byte to $CELERY_FLOOR_TALLY, which the driver polls (a local
file append, cheaper than any Redis write the floor would otherwise have to add)."""

from __future__ import annotations

import os
import subprocess

from tbss_queue.config import Settings
from tbss_queue.queue.app import make_app

TASK = "floor.run"

app = make_app(
    Settings.resolve(env={}, broker=os.environ.get("CELERY_FLOOR_BROKER", "redis://localhost"))
)


@app.task(name=TASK)
def run(argv: list[str]) -> None:
    subprocess.run(argv, check=False)
    with open(os.environ["CELERY_FLOOR_TALLY"], "ab") as tally:
        tally.write(b".")
