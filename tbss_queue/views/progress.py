"""Rendering batch status for people: a live progress bar, tables, durations.

Every figure comes from `BatchStatus` (status.py's one definition of rates and ETA); this
module only words and lays them out.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from tbss_queue.models import LOST, Batch, BatchStatus, NodeStatus, TaskRecord
from tbss_queue.sizes import human
from tbss_queue.views.causes import heading, last_line
from tbss_queue.views.visible import visible


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


def plural(n: int, word: str, many: str | None = None) -> str:
    """plural(1, 'command') -> '1 command'; plural(2, 'command') -> '2 commands'."""
    return f"{n:,} {word if n == 1 else (many or word + 's')}"


def clock(ts: float | None) -> str:
    """A Redis (Unix) time as this machine's local HH:MM:SS."""
    return "?" if ts is None else time.strftime("%H:%M:%S", time.localtime(ts))


def submitted_line(b: Batch) -> str:
    """What a submission did: queued, left as they were (a resubmission), skipped."""
    parts = [f"{plural(b.queued, 'command')} queued"]
    if b.unchanged:
        parts.append(f"{b.unchanged:,} already queued, running or done there")
    if b.skipped:
        parts.append(f"{b.skipped:,} skipped")
    return f"batch {b.id}: " + ", ".join(parts)


def left_watching(batch_id: str, last: BatchStatus | None = None) -> str:
    """What Ctrl-C on a watch or a wait means: the batch goes on without us, unless it had
    ended already (`last`: the status last shown)."""
    if last is not None and last.done:
        when = f" at {clock(last.last_ended)}" if last.last_ended is not None else ""
        return f"stopped watching; batch {batch_id} has ended{when} (tbss-queue status {batch_id})"
    return f"stopped watching; batch {batch_id} continues (tbss-queue status {batch_id})"


class RunEnd(Protocol):
    """What `run_ended_line` reads of a `local.RunResult`."""

    @property
    def status(self) -> BatchStatus: ...
    @property
    def wall_seconds(self) -> float: ...
    @property
    def resumed(self) -> int: ...
    @property
    def run_dir(self) -> str | None: ...


def run_ended_line(result: RunEnd) -> str:
    """`run`'s last line: how long this run took, and, for a run that resumed a batch, what
    the batch's own time (since its first start, in an earlier run) counts, so that the two
    durations on screen are not taken for one."""
    text = f"this run took {fmt_duration(result.wall_seconds)}"
    if result.resumed:
        text += f", resuming the batch ({plural(result.resumed, 'interrupted command')} ran again)"
    elapsed = result.status.elapsed_seconds
    if elapsed is not None and elapsed > result.wall_seconds + 1:
        text += f"; {fmt_duration(elapsed)} since the batch's first start, in an earlier run"
    if result.run_dir:
        text += f"; Redis data kept in {result.run_dir}"
    return text


def finished_count(s: BatchStatus) -> int:
    """Commands that ran to an end or were found done: never the cancelled ones, which did
    not finish (BatchStatus.finished counts them, as ended)."""
    return s.succeeded + s.failed + s.skipped


def speed(s: BatchStatus) -> str:
    """Throughput and ETA; once a batch has ended, its figures at its end (they stay put)."""
    if s.done and s.last_ended is not None:
        return (
            f"ended {clock(s.last_ended)} after {fmt_duration(s.elapsed_seconds)}: "
            f"{s.rate_overall:.1f}/min overall, {s.rate_recent:.1f}/min in its last 10 min"
        )
    if s.done:
        return "ended"
    return (
        f"{s.rate_recent:.1f}/min (last 10 min), {s.rate_overall:.1f}/min overall"
        f" | ETA {fmt_duration(s.eta_seconds)}"
    )


def summary_line(s: BatchStatus) -> str:
    return (
        f"batch {s.batch}: {s.succeeded} succeeded, {s.failed} failed, {s.running} running, "
        f"{s.queued} queued, {s.skipped} skipped"
        + (f", {s.cancelled} cancelled" if s.cancelled else "")
        + f" of {s.total}"
        + (f", {plural(s.requeued, 'requeue')}" if s.requeued else "")
        + f" | {speed(s)}"
    )


def notes(s: BatchStatus, more: Sequence[str] = ()) -> list[str]:
    """Lines that need a person's attention: no worker, lost and quarantined nodes, and `more`
    (the Slurm pilots)."""
    lines = list(more)
    if not s.done and s.no_worker_for is not None:
        lines.append(
            f"no worker online for {fmt_duration(s.no_worker_for)}: nothing runs until one "
            "starts (tbss-queue worker; see tbss-queue nodes)"
        )
    for n in s.nodes:
        if n.state == LOST:
            heard = (
                f"no heartbeat for {fmt_duration(n.heartbeat_age)}"
                if n.heartbeat_age is not None
                else "no heartbeat"
            )
            verb = "goes" if n.running == 1 else "go"
            running = (
                f"; its {plural(n.running, 'running command')} {verb} back to the queue "
                "when their leases lapse"
                if n.running
                else ""
            )
            lines.append(f"{n.node} lost: {heard}{running}")
        elif n.quarantined:
            lines.append(
                f"{n.node} quarantined: {n.quarantined} "
                f"(fix it, then: tbss-queue nodes resume {n.node})"
            )
        elif n.paused:
            lines.append(f"{n.node} paused: {n.paused}")
        for why in n.cannot:
            lines.append(f"{n.node} cannot run some commands, and takes the others: {why}")
    if s.requeued:
        lost = f", {s.lost} because a node was lost" if s.lost else ""
        lines.append(f"requeued {plural(s.requeued, 'time')}{lost}")
    return lines


_NUMERIC = ("running", "succeeded", "failed", "requeued", "cmds/hour", "heartbeat")


def _heartbeat(n: NodeStatus) -> str:
    return "-" if n.heartbeat_age is None else f"{fmt_duration(n.heartbeat_age)} ago"


def status_table(s: BatchStatus) -> Group:
    """The per-state counts, speed, and one row per worker node with its health."""
    title = escape(visible(f"batch {s.batch}  ({s.path})"))
    counts = Table(title=title, title_justify="left", box=None)
    columns = ("total", "queued", "running", "succeeded", "failed", "skipped", "cancelled")
    for col in columns:
        counts.add_column(col, justify="right")
    counts.add_row(*(str(getattr(s, c)) for c in columns))
    nodes = Table(box=None, title="workers", title_justify="left")
    for col in ("node", "state", *_NUMERIC):
        nodes.add_column(col, justify="right" if col in _NUMERIC else "left")
    for n in s.nodes:
        nodes.add_row(
            Text(visible(n.node)),
            n.state or "-",
            str(n.running),
            str(n.succeeded),
            str(n.failed),
            str(n.requeued),
            f"{n.per_hour:.0f}",
            _heartbeat(n),
        )
    parts: list[RenderableType] = [counts, Text(f"throughput {speed(s)}")]
    if s.nodes:
        parts.append(nodes)
    return Group(*parts)


def watch_screen(s: BatchStatus, width: int, *more: RenderableType) -> Group:
    """One frame of `status --watch`: when, how to leave, a bar beside its figures, the table,
    and what else the watcher asked for (the subject matrix)."""
    head = Text(f"batch {s.batch} · updated at {time.strftime('%H:%M:%S')} · Ctrl-C to leave")
    finished = finished_count(s)
    share = 100 * finished // max(s.total, 1)
    figures = f"{finished}/{s.total} finished ({share}%)"
    if s.cancelled:
        figures += f", {s.cancelled} cancelled"
    bar = Table.grid(padding=(0, 2))
    bar.add_column(width=max(10, min(60, width - len(figures) - 4)))
    bar.add_column(no_wrap=True)
    bar.add_row(ProgressBar(total=max(s.total, 1), completed=finished), figures)
    return Group(head, bar, status_table(s), *(Text(line) for line in notes(s)), *more)


def outage_line(since: float) -> str:
    """What every watcher says while the broker is out: it is not an error, it waits."""
    return f"broker unreachable since {clock(since)}, retrying"


def back_line(since: float) -> str:
    return f"broker back after {fmt_duration(time.time() - since)}"


OutageSink = Callable[[float | None], None]
"""Told when a broker outage began (a Unix time), then None once the broker answers."""


def watch(
    fetch: Callable[[OutageSink], BatchStatus],
    console: Console,
    interval: float = 3.0,
    extra: Callable[[BatchStatus], RenderableType] | None = None,
) -> BatchStatus | None:
    """A live dashboard redrawn every `interval` seconds until Ctrl-C; returns the last status
    shown (leaving is not an error: the batch goes on). `extra`: more of the same moment
    under the table, redrawn with it (`--matrix`). `fetch` rides out a broker outage and
    tells of it, so the last frame stays up under a line saying so."""
    last: BatchStatus | None = None
    more: tuple[RenderableType, ...] = ()
    try:
        with Live(console=console, auto_refresh=False, screen=False) as live:

            def on_outage(since: float | None) -> None:
                line = Text(outage_line(since)) if since is not None else Text("")
                if last is not None:
                    live.update(watch_screen(last, console.width, *more, line), refresh=True)
                else:
                    live.update(line, refresh=True)

            while True:
                last = fetch(on_outage)
                more = () if extra is None else (extra(last),)
                live.update(watch_screen(last, console.width, *more), refresh=True)
                time.sleep(interval)
    except KeyboardInterrupt:
        return last


SHOWN_CHARS = 2000
"""The most of one command the failures list shows (a line may be megabytes long)."""


def _capped(text: str) -> str:
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + f"… ({len(text):,} chars)"


def failures_text(records: Sequence[TaskRecord]) -> str:
    """The failed commands, each as a heading line saying why in words (`causes`), its
    command line whole and the last line of its stderr, whole: never cut or split mid-word
    (a terminal wraps long lines by itself, a pipe keeps them whole)."""
    lines = [f"failed commands ({len(records)}):"]
    for r in records:
        lines.append(heading(r))
        lines.append(f"  {_capped(r.text)}")
        if r.ran_text:
            lines.append(f"  ran: {_capped(r.ran_text)}")
        stderr = last_line(r.stderr_tail)
        if stderr:
            lines.append(f"  stderr: {stderr}")
        if r.peak_rss:
            lines.append(f"  peak memory: {human(r.peak_rss)} (its whole process tree)")
    # the command's own text: controls shown escaped, rich markup shown as written
    return "\n".join(escape(visible(line)) for line in lines)


def batches_table(items: Sequence[BatchStatus]) -> Table:
    """`batches`: one row per batch with a header: when submitted, the file, counts, speed."""
    table = Table(box=None)
    columns = ("batch", "submitted", "file", "total", "done", "failed", "cancelled", "left")
    for col in (*columns, "per min", ""):
        table.add_column(col, justify="right" if col in columns[3:] else "left")
    for b in items:
        table.add_row(
            b.batch,
            time.strftime("%Y-%m-%d %H:%M", time.localtime(b.submitted)),
            Text(visible(b.path)),
            str(b.total),
            str(finished_count(b)),
            str(b.failed),
            str(b.cancelled),
            str(b.queued + b.running),
            f"{b.rate_overall:.1f}",
            "ended" if b.done else f"ETA {fmt_duration(b.eta_seconds)}",
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
        self.last: BatchStatus | None = None
        """The status last shown (what Ctrl-C leaves behind)."""
        self._out_since: float | None = None

    def __enter__(self) -> Callable[[BatchStatus], None]:
        self.progress.start()
        return self.update

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(self, s: BatchStatus) -> None:
        self.last = s
        detail = (
            f"ok {s.succeeded}  failed {s.failed}  running {s.running}  "
            f"{s.rate_recent:.1f}/min  ETA {fmt_duration(s.eta_seconds)}"
        )
        if s.cancelled:
            detail = detail.replace("  running", f"  cancelled {s.cancelled}  running", 1)
        if not s.done and s.no_worker_for is not None:
            detail += f"  | no worker online for {fmt_duration(s.no_worker_for)}"
        if self._task is None:
            self._task = self.progress.add_task(f"batch {s.batch}", total=s.total, detail=detail)
        done = finished_count(s)
        self.progress.update(
            self._task, description=f"batch {s.batch}", completed=done, total=s.total, detail=detail
        )

    def outage(self, since: float | None) -> None:
        """A broker outage began at `since`, or (None) has ended: said beside the bar, which
        stays where it was, and once over, how long it lasted, above it."""
        if since is not None:
            self._out_since = since
            if self._task is None:
                self._task = self.progress.add_task("batch", total=None, detail="")
            self.progress.update(self._task, detail=outage_line(since))
            return
        if self._out_since is not None:
            self.progress.console.print(back_line(self._out_since), highlight=False)
            self._out_since = None
        if self.last is not None:
            self.update(self.last)


PROGRESS_LINES_FROM = 50_000
"""Commands from which `submit` shows its staging progress when stderr is not a terminal."""


class StagingProgress:
    """How far `submit` is through a large file: a bar on a terminal, else a line at each
    tenth (for files of PROGRESS_LINES_FROM commands or more), so a log shows it is working."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress: Progress | None = None
        self._task: TaskID | None = None
        self._shown = 0

    def __enter__(self) -> Callable[[int, int], None]:
        return self.update

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def update(self, staged: int, total: int) -> None:
        if self.console.is_terminal:
            if self.progress is None or self._task is None:
                self.progress = Progress(
                    TextColumn("staging"), BarColumn(), TaskProgressColumn(),
                    TextColumn("{task.completed:,.0f}/{task.total:,.0f} commands"),
                    console=self.console, transient=True,
                )  # fmt: skip
                self.progress.start()
                self._task = self.progress.add_task("staging", total=total)
            self.progress.update(self._task, completed=staged)
            return
        tenth = 10 * staged // total if total >= PROGRESS_LINES_FROM else 0
        if tenth > self._shown:
            self._shown = tenth
            self.console.print(
                f"staged {staged:,} of {total:,} commands ({10 * tenth}%)", highlight=False
            )
