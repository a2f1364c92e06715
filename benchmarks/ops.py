"""What each large operation costs Redis, and the submitter, at 10k / 100k / 1M commands.

    python -m benchmarks.ops                       # 10,000 100,000 1,000,000 (about 15 min)
    python -m benchmarks.ops --sizes 10000 100000  # quicker

For each size, on a fresh redis-server: submit a file of fsl_reg lines (a new process, as a
user runs it), then cancel, resubmit (a merge of every command), cancel, retry, the recovery
scans a reaper runs, `report`, and `forget`. While Redis runs one command (a Lua script is one
command) it answers nobody, so the figure that matters is the longest single command of each
operation: SLOWLOG's maximum (microseconds, Redis's own measure). Also the Redis memory per
queued command and its peak, the submitting process's peak RSS, and the report's wall time.
Results go to stdout as markdown; docs/benchmarks.md keeps them with the machine and date.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tbss_queue import api
from tbss_queue.config import Settings
from tbss_queue.queue.app import make_app
from tbss_queue.queue.batches import BatchStore
from tbss_queue.queue.broker import connect
from tbss_queue.queue.keys import CHUNK
from tbss_queue.queue.recovery import keep_tidy, missing_messages, republish_orphans

from .run import _commands_file, machine
from .systems import REPO, fresh_redis


def slowest(client: Any, action: Callable[[], object]) -> tuple[float, float]:
    """(longest single Redis command in ms, wall seconds) of `action`."""
    client.slowlog_reset()
    start = time.perf_counter()
    action()
    wall = time.perf_counter() - start
    entries = client.slowlog_get(100000)
    longest = max((e["duration"] for e in entries), default=0) / 1000.0
    return longest, wall


def submit_process(path: Path, url: str) -> tuple[float, float]:
    """Run `tbss-queue submit` as a user does: (wall seconds, peak RSS MiB of that process)."""
    env = {**os.environ, "TBSS_QUEUE_BROKER": url, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "tbss_queue", "submit", str(path)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"submit failed: {proc.stderr.read().decode() if proc.stderr else ''}")
    return wall, usage.ru_maxrss / 1024.0


class _Queued(BatchStore):
    """A store whose scripts are queued in `pipe` instead of sent: the workers' own calls
    (claim, finish: their keys and arguments), pipelined. Their replies are not read."""

    def __init__(self, store: BatchStore, pipe: Any) -> None:
        self.r = store.r
        self._scripts = store._scripts
        self.pipe = pipe

    def _run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        self._scripts[name](keys=list(keys), args=list(args), client=self.pipe)
        return "ok"


def _scans(app: Any, store: BatchStore, settings: Settings) -> None:
    """A reaper's scans: counters against the queue, a full orphan scan, tidying."""
    missing_messages(store, settings)
    republish_orphans(app, store, settings)
    keep_tidy(store, settings)


def as_if_run(store: BatchStore, batch: str, nodes: int) -> None:
    """Claim and finish every queued command of `batch` with claim.lua and finish.lua, as
    `nodes` one-slot workers back to back would (3-5 s each, 1 in 50 failing), pipelined."""
    specs = store.task_specs(batch)
    clock = [1.7e9] * nodes
    ids = list(specs)
    for start in range(0, len(ids), CHUNK):
        queued = _Queued(store, store.r.pipeline(transaction=False))
        for i, tid in enumerate(ids[start : start + CHUNK], start):
            node, token = f"w{i % nodes}@bench", f"t{i}"
            queued.claim(batch, tid, node, token, 60.0, 1)
            began = clock[i % nodes]
            clock[i % nodes] = ended = began + 3 + (i % 7) / 3
            state = "failed" if i % 50 == 0 else "succeeded"
            record = {"exit_code": 0 if state == "succeeded" else 1, "started": began,
                      "ended": ended, "duration": ended - began, "node": node, "slot": 1,
                      "line": specs[tid]["line"], "stdout_tail": "", "stderr_tail": "",
                      "cause": None if state == "succeeded" else "exit", "message": ""}  # fmt: skip
            queued.finish(batch, tid, node, token, state, record)
        queued.pipe.execute()


def one_size(workdir: Path, n: int) -> dict[str, str]:
    path = _commands_file(workdir, n)
    server = fresh_redis(workdir)
    out: dict[str, str] = {}
    try:
        settings = Settings.resolve(env={}, broker=server.url)
        client = connect(settings)
        client.config_set("slowlog-log-slower-than", 1000)  # 1 ms
        client.config_set("slowlog-max-len", 100000)
        before = int(client.info("memory")["used_memory"])
        client.slowlog_reset()
        wall, rss = submit_process(path, server.url)
        longest = max((e["duration"] for e in client.slowlog_get(100000)), default=0) / 1000
        out["submit"] = f"{longest:.1f} ms ({wall:.1f} s)"
        info = client.info("memory")
        out["Redis B/command"] = f"{(int(info['used_memory']) - before) / n:.0f}"
        out["Redis peak MiB"] = f"{int(info['used_memory_peak']) / 2**20:.0f}"
        out["submit RSS MiB"] = f"{rss:.0f}"
        batch = api.status(settings=settings).batch
        store = BatchStore(client)
        app = make_app(settings)

        def timed(name: str, action: Callable[[], object]) -> None:
            longest, wall = slowest(client, action)
            out[name] = f"{longest:.1f} ms ({wall:.1f} s)"

        timed("cancel", lambda: api.cancel(batch, settings=settings))
        timed("resubmit (merge)", lambda: api.submit(path, settings=settings))
        api.cancel(batch, settings=settings)
        timed("retry", lambda: api.retry(batch, settings=settings))
        # a reaper's scans: counters against the queue, then a full orphan scan and tidying
        timed(
            "recovery scans",
            lambda: _scans(app, store, settings),
        )
        # every command claimed and finished through the workers' own scripts (nothing runs:
        # the report's input, a million recorded attempts, is what matters here)
        as_if_run(store, batch, nodes=16)
        start = time.perf_counter()  # what `tbss-queue report` does: the HTML file
        api.report(batch, path=workdir / f"report-{n}.html", settings=settings, timeline=False)
        out["report s (all ran)"] = f"{time.perf_counter() - start:.1f}"
        start = time.perf_counter()  # `report --json`: also an entry per attempt
        json.dumps(api.report(batch, settings=settings))
        out["report --json s (all ran)"] = f"{time.perf_counter() - start:.1f}"
        keep_tidy(store, settings)
        timed("forget", lambda: api.forget(batch, settings=settings))
    finally:
        server.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    args = parser.parse_args()
    print(f"{machine()}; started {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    rows: dict[int, dict[str, str]] = {}
    with tempfile.TemporaryDirectory(prefix="tbssq-ops-") as tmp:
        for n in args.sizes:
            rows[n] = one_size(Path(tmp), n)
            print(f"{n:,}: {rows[n]}", file=sys.stderr, flush=True)
    names = list(next(iter(rows.values())))
    print(
        "| operation: longest Redis command (wall) | " + " | ".join(f"{n:,}" for n in rows) + " |"
    )
    print("|---|" + "---|" * len(rows))
    for name in names:
        print(f"| {name} | " + " | ".join(rows[n][name] for n in rows) + " |")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(f"\nmax RSS of this process: {peak} MiB")


if __name__ == "__main__":
    main()
