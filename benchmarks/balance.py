"""Balance at many nodes: the same seeded sleeps on N worker nodes through tbss-queue, plain
Celery and xargs, each against the ideal greedy schedule, and where the rest of the time goes.

    python -m benchmarks.balance                            # 32 nodes x 1 slot, 3,000 sleeps
    python -m benchmarks.balance --nodes 8 --commands 60    # to try the harness (about 1 min)

Each system gets a redis-server of its own on a free loopback port and N worker processes
(distinct node names, concurrency 1: tbss-queue as `tbss-queue worker`, plain Celery as
benchmarks/plain_celery.py's workers with Celery's default prefetch). Every process it starts is
stopped on the way out, also on Ctrl-C, SIGTERM or SIGHUP. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import functools
import heapq
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from tbss_queue import api
from tbss_queue.redis_server import RedisServer, free_port

from .systems import REPO, PlainCelery, System, TbssQueue, Xargs

SEED = 20261127
LOW, HIGH = 0.2, 3.0
"""Sleep durations are uniform in [LOW, HIGH] seconds (the issue's 0.2-3 s)."""

START_CHUNK = 8
"""Worker nodes started at a time: 32 Celery start-ups at once on 2 cores outlast the wait."""


@dataclass(frozen=True)
class Span:
    """One command as it ran: its slot (node, pool process), start, end, and nominal length."""

    row: str
    started: float
    ended: float
    nominal: float


@dataclass(frozen=True)
class Trace:
    """One system's run: the clock's start (before the first command was handed over), when
    submitting returned, and every command's span."""

    system: str
    t0: float
    submitted: float
    spans: list[Span]


def workload(n: int, seed: int = SEED) -> tuple[list[str], list[float]]:
    """`n` distinct sleep lines and their nominal durations (sleep adds its arguments; the
    second one keeps the lines distinct, as tbss-queue queues a duplicate line once)."""
    rng = random.Random(seed)
    lines, nominal = [], []
    for i in range(n):
        d = round(rng.uniform(LOW, HIGH), 3)
        lines.append(f"sleep {d} 0.{i:06d}")
        nominal.append(d + i / 1e6)
    return lines, nominal


def list_schedule(durations: Sequence[float], slots: int) -> list[tuple[int, float, float]]:
    """Greedy list scheduling with zero overhead: each command, in the order given, starts on
    the slot that frees first. Returns (slot, start, end) per command."""
    free = [(0.0, s) for s in range(slots)]
    out = []
    for d in durations:
        at, slot = heapq.heappop(free)
        out.append((slot, at, at + d))
        heapq.heappush(free, (at + d, slot))
    return out


def ideal_spans(durations: Sequence[float], slots: int, longest_first: bool = False) -> list[Span]:
    """The ideal schedule as spans from t0 = 0; `longest_first` is LPT (sorted, longest first)."""
    order = sorted(durations, reverse=True) if longest_first else list(durations)
    return [Span(f"slot {s}", a, b, b - a) for s, a, b in list_schedule(order, slots)]


def _rows(spans: Sequence[Span]) -> dict[str, list[Span]]:
    rows: dict[str, list[Span]] = {}
    for s in sorted(spans, key=lambda s: s.started):
        rows.setdefault(s.row, []).append(s)
    return rows


def analyse(spans: Sequence[Span], t0: float, slots: int) -> dict[str, Any]:
    """Where a run's slot-time went. Over all `slots` rows (a row that ran nothing is idle
    throughout), slots x makespan = start-up + busy + gaps + idle at the end, exactly, and
    busy = nominal + exec overhead. The ideal has neither start-up, gaps nor overhead, so
    makespan - ideal = (start-up + overhead + gaps + end idle - the ideal's end idle) / slots."""
    rows = _rows(spans)
    end = max(s.ended for s in spans)
    head = sum(r[0].started - t0 for r in rows.values())
    busy = sum(s.ended - s.started for s in spans)
    gaps = [b.started - a.ended for r in rows.values() for a, b in zip(r, r[1:], strict=False)]
    idle_end = sum(end - r[-1].ended for r in rows.values()) + (slots - len(rows)) * (end - t0)
    # in a perfect pull queue the first slot to run dry finds the queue empty: nothing starts
    # later; a command that does was held elsewhere (a prefetched message) or dispatched late
    dry = min((r[-1].ended for r in rows.values()), default=t0) if len(rows) == slots else t0
    return {
        "makespan": end - t0,
        "rows": len(rows),
        "head": head,
        "overhead": busy - sum(s.nominal for s in spans),
        "gaps": gaps,
        "idle_end": idle_end,
        "tail": end - max(s.started for s in spans),
        "late": sum(1 for s in spans if s.started > dry),
    }


def loss_table(traces: Sequence[Trace], nominal: Sequence[float], slots: int) -> str:
    """The markdown table of one run: ratios against the ideal, then the loss, term by term."""
    ideal = analyse(ideal_spans(nominal, slots), 0.0, slots)
    lpt = analyse(ideal_spans(nominal, slots, longest_first=True), 0.0, slots)
    ideal_m = ideal["makespan"]
    cols = {
        t.system: analyse(t.spans, t.t0, slots) | {"submit": t.submitted - t.t0} for t in traces
    }

    def per_slot(key: str, a: dict[str, Any]) -> str:
        v = a[key] / slots
        return f"{v:.2f} s ({100 * v / ideal_m:.2f} %)"

    def gap_ms(a: dict[str, Any]) -> str:
        g = sorted(a["gaps"])
        if not g:
            return "n/a"
        p90 = g[int(0.9 * (len(g) - 1))]
        mean, median = statistics.mean(g), statistics.median(g)
        return f"{1000 * mean:.1f} / {1000 * median:.1f} / {1000 * p90:.1f} / {1000 * g[-1]:.0f}"

    def end_idle(a: dict[str, Any]) -> str:
        v = (a["idle_end"] - ideal["idle_end"]) / slots
        return f"{v:+.2f} s ({100 * v / ideal_m:+.2f} %)"

    figures: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("makespan, s (clock start to last command's end)", lambda a: f"{a['makespan']:.2f}"),
        (
            f"**ideal / makespan** (ideal: list scheduling in submission order, {ideal_m:.2f} s)",
            lambda a: f"**{ideal_m / a['makespan']:.4f}**",
        ),
        ("makespan / ideal", lambda a: f"{a['makespan'] / ideal_m:.4f}"),
        (
            f"LPT ideal / makespan (longest first, {lpt['makespan']:.2f} s: a reordering bound)",
            lambda a: f"{lpt['makespan'] / a['makespan']:.4f}",
        ),
        (
            "loss: start-up, per slot (clock start to the slot's first start)",
            lambda a: per_slot("head", a),
        ),
        ("  of which submitting (until submit returned)", lambda a: f"{a['submit']:.2f} s"),
        (
            "loss: exec overhead, per slot (run time beyond the nominal sleep)",
            lambda a: per_slot("overhead", a),
        ),
        (
            "loss: dispatch gaps, per slot (one command's end to the next one's start)",
            lambda a: (
                f"{sum(a['gaps']) / slots:.2f} s ({100 * sum(a['gaps']) / slots / ideal_m:.2f} %)"
            ),
        ),
        ("  dispatch gap, ms: mean / median / p90 / max", gap_ms),
        ("loss: idle at the end beyond the ideal's, per slot", end_idle),
        (f"tail: last start to end, s (ideal {ideal['tail']:.2f})", lambda a: f"{a['tail']:.2f}"),
        ("commands started after the first slot ran dry (ideal 0)", lambda a: str(a["late"])),
        ("slots that ran a command", lambda a: f"{a['rows']} of {slots}"),
    ]
    head = "| figure | " + " | ".join(cols) + " |"
    sep = "|---" * (len(cols) + 1) + "|"
    body = [f"| {name} | " + " | ".join(f(a) for a in cols.values()) + " |" for name, f in figures]
    return "\n".join([head, sep, *body])


def start_nodes(system: TbssQueue | PlainCelery, nodes: int) -> None:
    """`nodes` worker processes of one slot each, a few at a time, all ready before returning."""
    for first in range(0, nodes, START_CHUNK):
        system.start(min(START_CHUNK, nodes - first), 1, first=first)


def run_tbss_queue(system: TbssQueue, lines: Sequence[str], nominal: Sequence[float]) -> Trace:
    """Submit `lines` as one batch, wait for it, and read the spans from tbss-queue's records
    (`api.report`'s timeline: what `tbss-queue report --json` prints)."""
    system.runs += 1
    path = system.workdir / f"balance-{system.runs}.commands"
    path.write_text("".join(f"{line}\n" for line in lines))
    t0 = time.time()
    batch = api.submit(path, cwd=system.workdir, settings=system.settings)
    submitted = time.time()
    while not api.status(batch.id, settings=system.settings).done:
        time.sleep(0.05)
    timeline = api.report(batch.id, settings=system.settings)["timeline"]
    bad = [r for r in timeline if r["state"] != "succeeded"]
    if bad or len(timeline) != len(lines):
        raise RuntimeError(f"tbss-queue: {len(timeline)} of {len(lines)} ran, {len(bad)} failed")
    spans = [
        Span(f"{r['node']} #{r['slot']}", r["started"], r["ended"], nominal[r["line"] - 1])
        for r in timeline
    ]
    return Trace(system.name, t0, submitted, spans)


def run_plain_celery(system: PlainCelery, lines: Sequence[str], nominal: Sequence[float]) -> Trace:
    """One `apply_async` per line, as benchmarks/plain_celery.py submits; the spans come back in
    each task's result (plain.timed)."""
    from benchmarks.plain_celery import make_app

    task = make_app(system.server.url).tasks["plain.timed"]
    t0 = time.time()
    results = [task.apply_async((line,)) for line in lines]
    submitted = time.time()
    spans = []
    for r, d in zip(results, nominal, strict=True):
        out = r.get(timeout=3600)
        if out["code"] != 0:
            raise RuntimeError(f"plain Celery: a command failed: {out}")
        spans.append(Span(f"{out['node']} pid {out['pid']}", out["started"], out["ended"], d))
    return Trace(system.name, t0, submitted, spans)


def warm_up(run: Callable[[Sequence[str], Sequence[float]], Trace], nodes: int) -> None:
    """One short sleep per node before the clock starts (imports, the first pool process,
    tbss-queue's guard process): how many nodes it reached is printed, not enforced."""
    # three arguments: no line of the workload's (two) is the same, so none is skipped as done
    trace = run([f"sleep 0.25 0.25 0.{i:06d}" for i in range(nodes)], [0.5] * nodes)
    reached = len({s.row for s in trace.spans})
    print(f"  warm-up reached {reached} of {nodes} nodes", file=sys.stderr, flush=True)


def measure(
    make: type[TbssQueue] | type[PlainCelery],
    workdir: Path,
    nodes: int,
    lines: Sequence[str],
    nominal: Sequence[float],
) -> Trace:
    """A fresh redis-server and `nodes` fresh workers for one system; all stopped on return."""
    server = RedisServer(
        Path(tempfile.mkdtemp(dir=workdir, prefix="redis-")),
        port=free_port(),
        persistent=False,
        die_with_parent=True,
    )
    system: System | None = None
    try:
        server.start()
        system = make(workdir, server)
        started = time.monotonic()
        start_nodes(system, nodes)
        print(f"  {nodes} nodes ready in {time.monotonic() - started:.0f} s", file=sys.stderr)
        run: Callable[[Sequence[str], Sequence[float]], Trace] = (
            functools.partial(run_tbss_queue, system)
            if isinstance(system, TbssQueue)
            else functools.partial(run_plain_celery, system)
        )
        warm_up(run, nodes)
        return run(lines, nominal)
    finally:
        if system is not None:
            system.stop()
        server.stop()


def _interrupted(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=32, help="worker nodes, 1 slot each")
    parser.add_argument("--commands", type=int, default=3000, help="sleeps of 0.2-3 s")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument(
        "--systems", default="tbss-queue,plain-celery,xargs", help="comma-separated, in order"
    )
    parser.add_argument("--json", type=Path, help="also write every span here, for a closer look")
    args = parser.parse_args(argv)
    # so the `finally`s stop what was started (SIGINT too: a background job inherits it ignored)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupted)
    os.environ["PYTHONPATH"] = str(REPO)  # plain Celery's workers import benchmarks/
    warnings.simplefilter("ignore")  # plain Celery apps made per run re-register their task
    lines, nominal = workload(args.commands, args.seed)
    ideal = list_schedule(nominal, args.nodes)
    print(
        f"{args.commands} sleeps ({sum(nominal):.0f} s in all) on {args.nodes} nodes x 1 slot: "
        f"ideal makespan {max(e for _, _, e in ideal):.1f} s",
        file=sys.stderr,
        flush=True,
    )
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    traces: list[Trace] = []
    extra: list[str] = []
    with tempfile.TemporaryDirectory(prefix="tbssq-balance-") as tmp:
        workdir = Path(tmp)
        for name in args.systems.split(","):
            print(name, file=sys.stderr, flush=True)
            if name == "xargs":
                xargs = Xargs(workdir)
                xargs.start(args.nodes, 1)
                took = xargs.run(lines)
                best = max(e for _, _, e in ideal)
                extra.append(
                    f"xargs -P {args.nodes} (one process forking every command, no queue): "
                    f"makespan {took:.2f} s, ideal / makespan {best / took:.4f}"
                )
                print(f"  {extra[-1]}", file=sys.stderr, flush=True)
                continue
            makes: dict[str, type[TbssQueue] | type[PlainCelery]] = {
                "tbss-queue": TbssQueue,
                "plain-celery": PlainCelery,
            }
            make = makes[name]
            trace = measure(make, workdir, args.nodes, lines, nominal)
            traces.append(trace)
            took = analyse(trace.spans, trace.t0, args.nodes)["makespan"]
            print(f"  makespan {took:.2f} s", file=sys.stderr, flush=True)
    if args.json:
        args.json.write_text(json.dumps([asdict(t) for t in traces]))
    print(
        f"Run {started}: {args.commands} sleeps of {LOW}-{HIGH} s (seed {args.seed}), "
        f"{args.nodes} nodes x 1 slot.\n"
    )
    print(loss_table(traces, nominal, args.nodes))
    for line in extra:
        print(f"\n{line}")


if __name__ == "__main__":
    main()
