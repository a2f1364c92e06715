"""The baseline: a plain Celery app with default settings, as a lab would first write it.

Worker:  celery -A benchmarks.plain_celery worker -c 2
Submit:  python -m benchmarks.plain_celery FILE   (one apply_async per line, then exits)
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from typing import Any

from celery import Celery, Task


def make_app(url: str) -> Celery:
    """Celery with default settings, result backend on the same Redis (results are awaited)."""
    app = Celery("plain", broker=url, backend=url)

    @app.task(name="plain.run")
    def run(line: str) -> int:
        return subprocess.run(shlex.split(line), check=False).returncode

    @app.task(name="plain.timed", bind=True)
    def timed(self: Task, line: str) -> dict[str, Any]:
        """`run` that also returns when and where the command ran (benchmarks/balance.py): the
        timestamps tbss-queue keeps in its records, here in the result plain Celery stores."""
        started = time.time()
        code = subprocess.run(shlex.split(line), check=False).returncode
        ended = time.time()
        node = self.request.hostname
        return {"code": code, "started": started, "ended": ended, "node": node, "pid": os.getpid()}

    return app


app = make_app(os.environ.get("PLAIN_CELERY_BROKER", "redis://localhost:6379/0"))
run = app.tasks["plain.run"]


def submit(path: str) -> list[Any]:
    with open(path) as fh:
        return [run.apply_async((line.strip(),)) for line in fh if line.strip()]


if __name__ == "__main__":
    start = time.perf_counter()
    submit(sys.argv[1])
    print(f"{time.perf_counter() - start:.3f}")
