"""Rendering batch status for people: a live progress bar, tables, durations."""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn
from rich.progress_bar import ProgressBar
from rich.table import Table

from .models import BatchStatus, TaskRecord


def fmt_duration(seconds: float | None) -> str:
    """3725 -> '1h02m'; None -> '?'."""
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    days, rem = divmod(seconds, 86400)
    hours, rem = divmod(rem, 3600)
    minutes, secs = divmod(rem, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def summary_line(s: BatchStatus) -> str:
    return (
        f"batch {s.batch}: {s.succeeded} succeeded, {s.failed} failed, {s.running} running, "
        f"{s.queued} queued, {s.skipped} skipped"
        + (f", {s.cancelled} cancelled" if s.cancelled else "")
        + f" of {s.total} | {s.rate_recent:.1f}/min (10 min), {s.rate_overall:.1f}/min overall"
        + f" | ETA {fmt_duration(s.eta_seconds) if not s.done else 'done'}"
    )


_NUMERIC = ("running", "succeeded", "failed", "cmds/hour", "last seen")


def node_notes(s: BatchStatus) -> list[str]:
    """One line per quarantined node: why, and how to let it back in (printed unwrapped)."""
    return [
        f"{n.node} quarantined: {n.quarantined} (fix it, then: tbss-queue nodes resume {n.node})"
        for n in s.nodes
        if n.quarantined
    ]


def status_table(s: BatchStatus) -> Group:
    """The per-state counts and one row per worker node."""
    counts = Table(title=f"batch {s.batch}  ({s.path})", title_justify="left", box=None)
    for col in ("total", "queued", "running", "succeeded", "failed", "skipped", "cancelled"):
        counts.add_column(col, justify="right")
    counts.add_row(
        *(
            str(getattr(s, c))
            for c in ("total", "queued", "running", "succeeded", "failed", "skipped", "cancelled")
        )
    )
    speed = (
        f"throughput {s.rate_recent:.1f}/min (last 10 min), {s.rate_overall:.1f}/min overall"
        f" | ETA {'done' if s.done else fmt_duration(s.eta_seconds)}"
    )
    nodes = Table(box=None, title="workers", title_justify="left")
    for col in ("node", "running", "succeeded", "failed", "cmds/hour", "last seen", "state"):
        nodes.add_column(col, justify="right" if col in _NUMERIC else "left")
    now = time.time()
    for n in s.nodes:
        seen = f"{fmt_duration(now - n.last_seen)} ago" if n.last_seen else "-"
        nodes.add_row(
            n.node,
            str(n.running),
            str(n.succeeded),
            str(n.failed),
            f"{n.per_hour:.0f}",
            seen,
            "quarantined" if n.quarantined else "",
        )
    return Group(counts, speed, nodes)


def watch(fetch: Callable[[], BatchStatus], console: Console, interval: float = 3.0) -> None:
    """A live dashboard of a batch, redrawn every `interval` seconds until Ctrl-C."""
    with Live(console=console, auto_refresh=False, screen=False) as live:
        while True:
            current = fetch()
            bar = ProgressBar(total=max(current.total, 1), completed=current.finished, width=60)
            done = f"{current.finished}/{current.total} finished"
            live.update(Group(bar, done, status_table(current)), refresh=True)
            time.sleep(interval)


SHOWN_CHARS = 2000
"""The most of one command a terminal table shows (a line may be megabytes long)."""


def _capped(text: str) -> str:
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + f"… ({len(text):,} chars)"


def failures_table(records: list[TaskRecord]) -> Table:
    table = Table(box=None, title="failed commands", title_justify="left")
    for col in ("line", "cause", "exit", "node", "command", "stderr (last line)"):
        table.add_column(col, overflow="fold")
    for r in records:
        last = r.stderr_tail.strip().splitlines()[-1:] or [r.message]
        table.add_row(
            str(r.line),
            r.cause or "-",
            "-" if r.exit_code is None else str(r.exit_code),
            r.node or "-",
            _capped(r.text) + (f"\nran: {_capped(r.ran_text)}" if r.ran_text else ""),
            last[0][:200],
        )
    return table


class LiveProgress:
    """A rich progress bar fed with BatchStatus updates (used by submit --wait and run)."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.completed:.0f}/{task.total:.0f}"),
            TextColumn("{task.fields[detail]}"),
            console=self.console,
            transient=False,
        )
        self._task: TaskID | None = None

    def __enter__(self) -> Callable[[BatchStatus], None]:
        self.progress.start()
        return self.update

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(self, s: BatchStatus) -> None:
        detail = (
            f"ok {s.succeeded}  failed {s.failed}  running {s.running}  "
            f"{s.rate_recent:.1f}/min  ETA {fmt_duration(s.eta_seconds)}"
        )
        if self._task is None:
            self._task = self.progress.add_task(f"batch {s.batch}", total=s.total, detail=detail)
        self.progress.update(self._task, completed=s.finished, total=s.total, detail=detail)
