"""Every workload through tbss-queue and each installed peer, in one run; a markdown table.

    pip install -e '.[bench]'
    python -m benchmarks.run                  # the full run (about 15 minutes on 2 cores)
    python -m benchmarks.run --quick          # smaller sizes, to try the harness
    python -m benchmarks.run --scale          # also the 1,000,000-command batch
    python -m benchmarks.run --only overhead --systems tbss-queue,HyperQueue --quick

Timings are only compared within one run (same machine, same moment): see docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import heapq
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from tbss_queue import api
from tbss_queue.config import Settings
from tbss_queue.queue.batches import BatchStore
from tbss_queue.queue.broker import connect
from tbss_queue.queue.recovery import heartbeats_judgeable

from .systems import (
    REPO,
    CeleryFloor,
    CelerySoloFloor,
    GnuParallel,
    PlainCelery,
    System,
    TbssQueue,
    Xargs,
    fresh_redis,
    installed_peers,
    redis_client,
    tree_rss,
)

Row = tuple[str, dict[str, str], str]  # figure, system -> value, tbss-queue vs best peer


def ideal_greedy(durations: Sequence[float], slots: int) -> float:
    """Makespan of list scheduling with zero overhead: each command, in order, goes to the
    slot that frees first (what a perfect pull queue does)."""
    free = [0.0] * slots
    for d in durations:
        heapq.heappush(free, heapq.heappop(free) + d)
    return max(free)


def balance_durations(n: int = 300, seed: int = 20261125) -> list[float]:
    rng = random.Random(seed)
    return [round(min(3.0, max(0.05, rng.lognormvariate(-0.9, 0.9))), 3) for _ in range(n)]


ROUNDS = 3
"""Rounds of every system in turn (the median is reported): this machine's speed drifts by
10-20% over minutes, so one round each could rank systems by when they ran."""

SPAWNERS = (Xargs.name, GnuParallel.name)
"""One process forking every line on one machine, with no queue: the floor, shown beside the
queues but never the best peer of a ratio."""

FLOOR_SYSTEMS: tuple[type[System], ...] = (CeleryFloor, CelerySoloFloor)
"""Celery running the line and nothing else (benchmarks/celery_floor.py): what one Celery
message per command costs, shown beside the queues but never the best peer of a ratio."""
FLOORS = tuple(s.name for s in FLOOR_SYSTEMS)

ON_REDIS = (TbssQueue, PlainCelery, *FLOOR_SYSTEMS)
"""The systems given a fresh redis-server of their own for each round."""


def systems_to_run(names: set[str] | None = None) -> list[type[System]]:
    """tbss-queue, plain Celery, Celery's floors and every installed peer; only those named
    (any case) if `names` is given."""
    every: list[type[System]] = [TbssQueue, PlainCelery, *FLOOR_SYSTEMS, *installed_peers()]
    if names is None:
        return every
    wanted = {n.lower() for n in names}
    unknown = wanted - {s.name.lower() for s in every}
    if unknown:
        known = ", ".join(s.name for s in every)
        raise SystemExit(f"unknown or not installed: {', '.join(sorted(unknown))} (have: {known})")
    return [s for s in every if s.name.lower() in wanted]


def each_system(
    workdir: Path,
    nodes: int,
    slots: int,
    job: Callable[[System], float],
    digits: int,
    rounds: int = ROUNDS,
    systems: Sequence[type[System]] | None = None,
) -> dict[str, str]:
    """Run `job` on every system (or those given), started fresh with `nodes` x `slots`,
    `rounds` rounds taken in turn; each value is 'median (min-max)'."""
    samples: dict[str, list[float]] = {}
    failed: dict[str, str] = {}
    makes = list(systems) if systems is not None else systems_to_run()
    for _ in range(rounds):
        for make in makes:
            server = fresh_redis(workdir) if make in ON_REDIS else None
            system = make(workdir, server) if server else make(workdir)  # type: ignore[call-arg]
            try:
                system.start(nodes, slots)
                samples.setdefault(system.name, []).append(job(system))
            except Exception as exc:  # a peer failing must not lose the others' numbers
                failed[system.name] = f"failed: {type(exc).__name__}: {exc}"[:80]
            finally:
                system.stop()
                if server:
                    server.stop()
            print(f"  {system.name}: {samples.get(system.name)}", file=sys.stderr, flush=True)
    out = dict(failed)
    for name, values in samples.items():
        if name not in failed:
            out[name] = (
                f"{statistics.median(values):.{digits}f} "
                f"({min(values):.{digits}f}-{max(values):.{digits}f})"
            )
    return out


def ratio(values: dict[str, str], lower_is_better: bool = True) -> str:
    """tbss-queue's value relative to the best peer's (>1 is worse when lower is better)."""

    def num(v: str) -> float | None:
        try:
            return float(v.split()[0])
        except (ValueError, IndexError):
            return None

    ours = num(values.get("tbss-queue", ""))
    peers = [n for k, v in values.items() if k != "tbss-queue" and (n := num(v)) is not None]
    if ours is None or not peers:
        return "n/a"
    best = min(peers) if lower_is_better else max(peers)
    return f"{ours / best:.2f}" if best else "n/a"


def queues_only(values: dict[str, str]) -> dict[str, str]:
    """The values of tbss-queue and the queues it is compared with: plain Celery, ipyparallel,
    dask, HyperQueue (issue 23: below HyperQueue and plain Celery), not the spawners or
    Celery's floors."""
    return {k: v for k, v in values.items() if k not in SPAWNERS + FLOORS}


def overhead(
    workdir: Path, n: int, rounds: int = ROUNDS, systems: Sequence[type[System]] | None = None
) -> Row:
    lines = [f"true {i}" for i in range(n)]  # distinct lines: tbss-queue queues duplicates once

    def job(s: System) -> float:
        return 1000 * s.run(lines) * 2 / n

    values = each_system(workdir, 1, 2, job, 2, rounds, systems)
    return (
        f"overhead: ms per `true` command per slot ({n} on 1 node x 2 slots)",
        values,
        ratio(queues_only(values)),
    )


def balance(
    workdir: Path, n: int, rounds: int = ROUNDS, systems: Sequence[type[System]] | None = None
) -> Row:
    durations = balance_durations(n)
    ideal = ideal_greedy(durations, 8)
    # distinct lines (sleep adds its arguments: the second adds at most 0.3 ms)
    lines = [f"sleep {d} 0.{i:06d}" for i, d in enumerate(durations)]

    def job(s: System) -> float:
        return ideal / s.run(lines)

    values = each_system(workdir, 4, 2, job, 3, rounds, systems)
    # xargs and GNU parallel have one machine's 8 slots, not 4 nodes: shown, not peers here
    return (
        f"balance: ideal greedy makespan / makespan ({n} sleeps, 4 nodes x 2 slots; "
        f"ideal {ideal:.1f} s)",
        values,
        ratio(queues_only(values), lower_is_better=False),
    )


def _commands_file(workdir: Path, n: int) -> Path:
    path = workdir / f"submit-{n}.commands"
    with open(path, "w") as fh:
        for i in range(n):
            a, b = i % 1000, i // 1000
            fh.write(f"fsl_reg FA/s{a:04d}_FA FA/s{b:04d}_FA s{a:04d}_FA_to_s{b:04d}_FA -e -FA\n")
    return path


def submit_and_memory(workdir: Path, sizes: Sequence[int]) -> list[Row]:
    """Seconds from invoking submit to all enqueued (as a user runs it: a new process), Redis
    bytes per queued command, and `status` latency on the largest batch."""
    rows: list[Row] = []
    for n in sizes:
        path = _commands_file(workdir, n)
        times: dict[str, str] = {}
        memory: dict[str, str] = {}
        status_ms: dict[str, str] = {}
        for name in ("tbss-queue", "plain Celery"):
            server = fresh_redis(workdir)
            try:
                client = redis_client(server)
                before = client.info("memory")["used_memory"]
                if name == "tbss-queue":
                    env = {**os.environ, "TBSS_QUEUE_BROKER": server.url, "PYTHONPATH": str(REPO)}
                    cmd = [sys.executable, "-m", "tbss_queue", "submit", str(path)]
                else:
                    env = {**os.environ, "PLAIN_CELERY_BROKER": server.url, "PYTHONPATH": str(REPO)}
                    cmd = [sys.executable, "-m", "benchmarks.plain_celery", str(path)]
                start = time.perf_counter()
                subprocess.run(cmd, env=env, check=True, capture_output=True, cwd=workdir)
                wall = time.perf_counter() - start
                times[name] = f"{wall:.2f} s ({n / wall:,.0f}/s)"
                used = client.info("memory")["used_memory"] - before
                memory[name] = f"{used / n:.0f}"
                if name == "tbss-queue":
                    settings = Settings.resolve(env={}, broker=server.url)
                    samples = []
                    for _ in range(50):
                        t = time.perf_counter()
                        api.status(settings=settings)
                        samples.append(time.perf_counter() - t)
                    status_ms[name] = f"{1000 * statistics.median(samples):.2f}"
                    t = time.perf_counter()
                    subprocess.run(
                        [sys.executable, "-m", "tbss_queue", "status"],
                        env=env,
                        check=True,
                        capture_output=True,
                    )
                    status_ms["tbss-queue CLI"] = f"{1000 * (time.perf_counter() - t):.0f}"
            finally:
                server.stop()
        rows.append(
            (f"submit: {n:,} commands, invoke to all enqueued", times, f"{_speedup(times)}x faster")
        )
        rows.append((f"memory: Redis bytes per queued command ({n:,})", memory, ratio(memory)))
        rows.append(
            (f"status: ms on a {n:,}-command batch (API median; CLI incl. start-up)", status_ms, "")
        )
    return rows


def _speedup(times: dict[str, str]) -> str:
    ours, theirs = (float(times[k].split()[0]) for k in ("tbss-queue", "plain Celery"))
    return f"{theirs / ours:.1f}"


def worker_rss(workdir: Path) -> Row:
    values = {}
    for make in (TbssQueue, PlainCelery):
        server = fresh_redis(workdir)
        system = make(workdir, server)
        try:
            system.start(1, 4)
            system.run(["true"] * 20)
            values[system.name] = f"{tree_rss(system.pids) / 4 / 2**20:.0f}"
        finally:
            system.stop()
            server.stop()
    return (
        "memory: worker RSS per slot, MiB (1 node x 4 slots, main process included)",
        values,
        ratio(values),
    )


def recovery(workdir: Path) -> Row:
    """SIGKILL a node mid-command (default heartbeat 10 s, lost after 60 s): seconds until the
    command runs on another node. Bound promised: LOST_AFTER + HEARTBEAT = 70 s (the command
    must outlast the wait for Redis's uptime, about 80 s, and the recovery)."""
    server = fresh_redis(workdir)
    system = TbssQueue(workdir, server)
    try:
        system.start(1, 1)
        path = workdir / "recovery.commands"
        path.write_text("sleep 300\n")
        batch = api.submit(path, cwd=workdir, settings=system.settings)
        while api.status(batch.id, settings=system.settings).running == 0:
            time.sleep(0.05)
        system.start(1, 1, first=1)  # an idle second node, w1
        # a Redis up for less than LOST_AFTER + 2 heartbeats makes reapers wait (right after a
        # restart every heartbeat looks expired): measure the steady state of a running study
        store = BatchStore(connect(system.settings))
        while not heartbeats_judgeable(store, system.settings):
            time.sleep(0.5)
        os.killpg(system.pids[0], signal.SIGKILL)
        killed = time.perf_counter()
        while not any(
            n.running and n.node.startswith("w1@")
            for n in api.status(batch.id, settings=system.settings).nodes
        ):
            time.sleep(0.1)
        took = time.perf_counter() - killed
    finally:
        system.stop()
        server.stop()
    return (
        "recovery: s from SIGKILL of a node to its command running elsewhere (bound 70)",
        {"tbss-queue": f"{took:.1f}"},
        "",
    )


def scale(workdir: Path, n: int, nodes: int, seconds: float) -> list[Row]:
    """A 1,000-subject study's batch: submit, Redis peak memory, status latency, and whether
    counters stay exact while `nodes` workers drain it for `seconds`."""
    server = fresh_redis(workdir)
    system = TbssQueue(workdir, server)
    values: dict[str, str] = {}
    try:
        path = workdir / "scale.commands"
        with open(path, "w") as fh:
            for i in range(n):
                fh.write(f"true {i}\n")  # `sleep 0 {i}` would sleep i seconds
        client = redis_client(server)
        env = {**os.environ, "TBSS_QUEUE_BROKER": server.url, "PYTHONPATH": str(REPO)}
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "tbss_queue", "submit", str(path)],
            env=env,
            check=True,
            capture_output=True,
        )
        values["submit s"] = f"{time.perf_counter() - start:.1f}"
        values["Redis peak MiB"] = f"{client.info('memory')['used_memory_peak'] / 2**20:.0f}"
        samples = []
        for _ in range(20):
            t = time.perf_counter()
            st = api.status(settings=system.settings)
            samples.append(time.perf_counter() - t)
        values["status ms"] = f"{1000 * statistics.median(samples):.2f}"
        system.start(nodes, 1)
        t0 = time.perf_counter()
        time.sleep(seconds)
        st = api.status(settings=system.settings)
        done = st.succeeded + st.failed
        values["ran/min with 16 nodes"] = f"{60 * done / (time.perf_counter() - t0):.0f}"
        system.stop()
        time.sleep(1)
        st = api.status(settings=system.settings)
        states = client.hvals(f"tbssq:b:{st.batch}:state")
        exact = sum(1 for s in states if s == b"succeeded") == st.succeeded
        values["counters exact"] = "yes" if exact and st.total == n else "NO"
        # the HTML report reads every command of the batch: the one reader that grows with it
        t = time.perf_counter()
        api.report(st.batch, path=workdir / "scale-report.html", settings=system.settings)
        values["report s"] = f"{time.perf_counter() - t:.1f}"
    finally:
        system.stop()
        server.stop()
    return [(f"scale: {n:,}-command batch", values, "")]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        model = cpu
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{os.cpu_count()} cores ({model}), {mem:.0f} GiB, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}"
    )


def table(rows: Sequence[Row]) -> str:
    systems: list[str] = []
    for _, values, _ in rows:
        systems += [k for k in values if k not in systems]
    head = "| figure | " + " | ".join(systems) + " | tbss-queue vs best peer |"
    sep = "|---" * (len(systems) + 2) + "|"
    body = [
        f"| {fig} | " + " | ".join(values.get(s, "") for s in systems) + f" | {r} |"
        for fig, values, r in rows
    ]
    return "\n".join([head, sep, *body])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument("--scale", action="store_true", help="also the 1,000,000-command batch")
    parser.add_argument("--skip-recovery", action="store_true")
    parser.add_argument(
        "--only", help="comma-separated workloads: overhead,balance,submit,rss,recovery"
    )
    parser.add_argument(
        "--rounds", type=int, help=f"rounds of every system in turn (default {ROUNDS}; --quick: 1)"
    )
    parser.add_argument(
        "--systems",
        help="comma-separated systems for overhead and balance (default: every one installed), "
        "e.g. 'tbss-queue,plain Celery,HyperQueue'",
    )
    args = parser.parse_args()
    only = set(args.only.split(",")) if args.only else None
    systems = systems_to_run(set(args.systems.split(","))) if args.systems else None

    def wanted(name: str) -> bool:
        return only is None or name in only

    os.environ["PYTHONPATH"] = str(REPO)  # the peers' worker processes import benchmarks/
    warnings.simplefilter("ignore")  # plain Celery apps made per run re-register their task
    quick = args.quick
    rounds = args.rounds or (1 if quick else ROUNDS)
    started = time.strftime("%Y-%m-%d %H:%M")
    workloads: list[tuple[str, str, Callable[[Path], list[Row]]]] = [
        (
            "overhead",
            "overhead",
            lambda w: [overhead(w, 200 if quick else 2000, rounds, systems)],
        ),
        ("balance", "balance", lambda w: [balance(w, 60 if quick else 300, rounds, systems)]),
        (
            "submit",
            "submit, memory, status",
            lambda w: submit_and_memory(w, [2000] if quick else [10_000, 100_000]),
        ),
        ("rss", "worker memory", lambda w: [worker_rss(w)]),
    ]
    if not args.skip_recovery:
        workloads.append(("recovery", "recovery (about 150 s)", lambda w: [recovery(w)]))
    if args.scale:
        workloads.append(("scale", "scale", lambda w: scale(w, 1_000_000, 16, 60)))
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="tbssq-bench-") as tmp:
        for name, title, run in workloads:
            if not wanted(name):
                continue
            print(title, file=sys.stderr, flush=True)
            try:
                rows += run(Path(tmp))
            except Exception as exc:  # keep the other workloads' numbers
                rows.append((f"{name}: FAILED", {"tbss-queue": f"{type(exc).__name__}: {exc}"}, ""))
            print(table(rows[-1:]), file=sys.stderr, flush=True)
    print(f"Run {started} on {machine()}.\n")
    # the 1,000,000-command batch has columns of its own: a table of its own
    print(table([r for r in rows if not r[0].startswith("scale")]))
    if any(r[0].startswith("scale") for r in rows):
        print()
        print(table([r for r in rows if r[0].startswith("scale")]))


if __name__ == "__main__":
    main()
