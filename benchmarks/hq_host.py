"""A lean process that holds HyperQueue's in-process LocalCluster for benchmarks.systems.

    python -m benchmarks.hq_host NODES SLOTS WORKDIR

HyperQueue's worker forks a full copy of the process it runs in for every task, so the cost of
a task grows with that process's memory: in the benchmark's own process, after dask and
ipyparallel have been imported, a `true` cost about 45% more than in a fresh one (and 4x more
with 400 MiB in use). This process imports only the standard library and `hyperqueue`, as
close to HyperQueue's own `hq` binary as the PyPI wheel allows.

It starts a server and NODES workers of SLOTS cores each, runs a task per slot (warm), and says
`ready` on standard output. Then each line read from standard input is a file of command lines,
run as one job (a `job.program` task per line, no shell, output discarded); it answers `ok`, or
`failed N` if N tasks failed. End of input stops the cluster. Anything else HyperQueue prints
(the server's settings table) goes to standard error.
"""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
import time
from typing import Any

from hyperqueue import Job, LocalCluster
from hyperqueue.cluster import WorkerConfig

POLL = 0.02
"""Seconds between status requests. The API's own wait_for_jobs asks once a second, which would
round every run up to a whole second."""


class _NotDone(Exception):
    pass


def run_job(client: Any, workdir: str, lines: list[str]) -> int:
    """Run the lines as one job; the number of tasks that failed."""
    job = Job(default_workdir=workdir, max_fails=None)
    for line in lines:
        job.program(shlex.split(line), stdout=None, stderr=None)
    submitted = client.submit(job)
    status: dict[int, dict[str, Any]] = {}

    def done(jobs: dict[int, dict[str, Any]]) -> None:
        if not all(s["completed"] for s in jobs.values()):
            raise _NotDone
        status.update(jobs)

    while True:
        try:  # one status request: the callback's exception ends the API's own wait loop
            client.connection.wait_for_jobs([submitted.id], done)
            break
        except _NotDone:
            time.sleep(POLL)
    return sum(int(s["failed"]) for s in status.values())


def main() -> None:
    nodes, slots, workdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever HyperQueue prints goes to standard error
    cluster = LocalCluster(server_dir=tempfile.mkdtemp(dir=workdir, prefix="hq-"))
    try:
        for _ in range(nodes):
            cluster.start_worker(WorkerConfig(cores=slots))
        client = cluster.client()
        # warm: every worker has connected once a task per slot has run
        run_job(client, workdir, [f"true warm {i}" for i in range(nodes * slots)])
        answers.write("ready\n")
        for request in sys.stdin:
            with open(request.strip()) as fh:
                lines = [line.strip() for line in fh if line.strip()]
            failed = run_job(client, workdir, lines)
            answers.write("ok\n" if not failed else f"failed {failed}\n")
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
