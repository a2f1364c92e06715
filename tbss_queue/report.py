"""A batch's report: numbers and plots in one self-contained HTML file, for a lab meeting.

Everything comes from the records the tasks write (start, end, node and slot of each command's
last attempt), not from Flower, so a report can be made any time while the records are kept.
The plots are matplotlib SVG with text kept as text (searchable, sharp at any zoom); with very
many commands the timeline's bars are drawn as an embedded image to keep the file small.
"""

from __future__ import annotations

import html
import io
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from matplotlib import rc_context
from matplotlib.figure import Figure

from .fsl.matrix import SubjectMatrix
from .models import BatchStatus, TaskRecord
from .progress import fmt_duration

STATE_COLOURS = {"succeeded": "#2e7d32", "failed": "#c62828"}
OTHER_COLOUR = "#9e9e9e"
RASTERIZE_ABOVE = 20_000
"""Timeline bars beyond which the Gantt chart is embedded as an image, not SVG shapes."""
FAILURES_SHOWN = 1000


@dataclass(frozen=True)
class _Run:
    """A command's last attempt that has a start and an end."""

    line: int
    node: str
    slot: int
    state: str
    started: float
    ended: float

    @property
    def duration(self) -> float:
        return self.ended - self.started

    @property
    def row(self) -> str:
        return _row_label(self.node, self.slot)


def _row_label(node: str, slot: int) -> str:
    return f"{node} #{slot}" if slot >= 0 else node


def _timed(records: Sequence[TaskRecord]) -> list[_Run]:
    return [
        _Run(r.line, r.node or "?", -1 if r.slot is None else r.slot, r.state, r.started, r.ended)
        for r in records
        if r.started is not None and r.ended is not None
    ]


def _unit(span: float) -> tuple[float, str]:
    """Seconds per plotted unit and its name, for a time axis covering `span` seconds."""
    if span > 3 * 3600:
        return 3600.0, "hours"
    if span > 180:
        return 60.0, "minutes"
    return 1.0, "seconds"


def report_data(
    status: BatchStatus, records: Sequence[TaskRecord], matrix: SubjectMatrix | None = None
) -> dict[str, Any]:
    """What the report shows, as plain data (what `report --json` prints); `matrix`: the
    subject matrix of a `tbss_2_reg -n` study (fsl/matrix.py), None for other batches."""
    timed = sorted(_timed(records), key=lambda r: r.started)
    durations = sorted(r.duration for r in timed)
    slots = {r.row for r in timed}
    # wall time and rate: status's one definition (first start to the end, frozen once ended)
    makespan = status.elapsed_seconds or 0.0
    busy = sum(durations)
    summary = {
        "batch": status.batch,
        "path": status.path,
        "total": status.total,
        "succeeded": status.succeeded,
        "failed": status.failed,
        "skipped": status.skipped,
        "cancelled": status.cancelled,
        "queued": status.queued,
        "running": status.running,
        "nodes": len({r.node for r in timed}),
        "slots": len(slots),
        "makespan_seconds": round(makespan, 3),
        "median_seconds": round(statistics.median(durations), 3) if durations else None,
        "mean_seconds": round(statistics.fmean(durations), 3) if durations else None,
        "max_seconds": round(durations[-1], 3) if durations else None,
        # share of slot time spent running commands: 1.0 means no slot was ever idle
        "utilisation": round(busy / (makespan * len(slots)), 4) if makespan and slots else None,
        "per_minute": status.rate_overall if makespan else None,
        "per_minute_recent": status.rate_recent,
        "eta_seconds": status.eta_seconds,
        "requeued": status.requeued,
        "lost": status.lost,
        # each node's state when the report was made (not its heartbeat's age, which ticks)
        "node_health": [
            {k: v for k, v in n.to_dict().items() if k != "heartbeat_age"} for n in status.nodes
        ],
    }
    return {
        "summary": summary,
        # plain dicts: dataclasses.asdict deep-copies, 13 s for 200,000 runs
        "timeline": [
            {
                "line": r.line,
                "node": r.node,
                "slot": r.slot,
                "state": r.state,
                "started": r.started,
                "ended": r.ended,
            }
            for r in timed
        ],  # fmt: skip
        "failures": [r.to_dict() for r in records if r.state == "failed"],
        "matrix": matrix.to_dict() if matrix is not None else None,
    }


def _svg(fig: Figure) -> str:
    buf = io.StringIO()
    with rc_context({"svg.fonttype": "none", "svg.hashsalt": "tbss-queue"}):
        fig.savefig(buf, format="svg", bbox_inches="tight")
    text = buf.getvalue()
    return text[text.index("<svg") :]


def timeline_svg(timed: Sequence[_Run]) -> str:
    """A Gantt chart: one row per worker slot, one bar per command; gaps are idle time."""
    rows = sorted({(r.node, r.slot) for r in timed})
    t0 = min(r.started for r in timed)
    span = max(r.ended for r in timed) - t0
    scale, unit = _unit(span)
    fig = Figure(figsize=(10, 1.2 + 0.28 * len(rows)))
    ax = fig.add_subplot()
    index = {row: i for i, row in enumerate(rows)}
    by_row: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for r in timed:
        row = index[(r.node, r.slot)]
        bar = ((r.started - t0) / scale, r.duration / scale)
        by_row.setdefault((row, r.state), []).append(bar)
    raster = len(timed) > RASTERIZE_ABOVE
    for (row, state), bars in by_row.items():
        colour = STATE_COLOURS.get(state, OTHER_COLOUR)
        ax.broken_barh(bars, (row - 0.4, 0.8), facecolors=colour, rasterized=raster)
    ax.set_yticks(range(len(rows)), [_row_label(*row) for row in rows])
    ax.invert_yaxis()
    ax.set_xlabel(f"{unit} since the first command started")
    ax.set_title("Every command on every worker slot (green: succeeded, red: failed)")
    ax.set_xlim(0, max(span / scale, 1e-9))
    return _svg(fig)


def throughput_svg(timed: Sequence[_Run]) -> str:
    """Commands finished per minute over time, and the overall average."""
    t0 = min(r.started for r in timed)
    span = max(max(r.ended for r in timed) - t0, 1.0)
    scale, unit = _unit(span)
    width = max(span / 60, 1.0)
    n_bins = int(span // width) + 1
    counts = [0] * n_bins
    for r in timed:
        counts[min(int((r.ended - t0) // width), n_bins - 1)] += 1
    per_minute = [c * 60 / width for c in counts]
    edges = [i * width / scale for i in range(n_bins + 1)]
    fig = Figure(figsize=(10, 3))
    ax = fig.add_subplot()
    ax.stairs(per_minute, edges, fill=True, color="#1565c0", alpha=0.6, label="per bin")
    ax.axhline(60 * len(timed) / span, color="#0d47a1", linestyle="--", label="overall")
    ax.set_xlabel(f"{unit} since the first command started")
    ax.set_ylabel("commands / minute")
    ax.set_title("Throughput")
    ax.legend(loc="upper right")
    return _svg(fig)


def durations_svg(timed: Sequence[_Run]) -> str:
    """How long commands took, succeeded and failed stacked."""
    longest = max(r.duration for r in timed)
    scale, unit = _unit(longest)
    groups = {
        state: [r.duration / scale for r in timed if r.state == state]
        for state in ("succeeded", "failed")
    }
    groups = {k: v for k, v in groups.items() if v}
    fig = Figure(figsize=(10, 3))
    ax = fig.add_subplot()
    ax.hist(
        list(groups.values()),
        bins=40,
        stacked=True,
        color=[STATE_COLOURS[k] for k in groups],
        label=list(groups),
    )
    ax.set_xlabel(f"duration ({unit})")
    ax.set_ylabel("commands")
    ax.set_title("Command durations")
    ax.legend(loc="upper right")
    return _svg(fig)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
.cards { display: flex; flex-wrap: wrap; gap: .8em; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: .5em 1em; min-width: 8em; }
.card b { display: block; font-size: 1.4em; }
table { border-collapse: collapse; width: 100%; font-size: .9em; }
td, th { border-bottom: 1px solid #eee; padding: .3em .5em; text-align: left;
  vertical-align: top; }
code { white-space: pre-wrap; word-break: break-all; }
svg { max-width: 100%; height: auto; }
"""


def _cards(summary: dict[str, Any]) -> str:
    def pct(x: float | None) -> str:
        return "?" if x is None else f"{100 * x:.1f}%"

    cards = [
        ("commands", summary["total"]),
        ("succeeded", summary["succeeded"]),
        ("failed", summary["failed"]),
        ("skipped", summary["skipped"]),
        ("still queued or running", summary["queued"] + summary["running"]),
        ("worker nodes / slots", f"{summary['nodes']} / {summary['slots']}"),
        ("wall time", fmt_duration(summary["makespan_seconds"])),
        ("median command", fmt_duration(summary["median_seconds"])),
        (
            "commands / minute",
            "?" if summary["per_minute"] is None else f"{summary['per_minute']:.1f}",
        ),
        ("slot utilisation", pct(summary["utilisation"])),
    ]
    return "".join(
        f'<div class="card">{html.escape(k)}<b>{html.escape(str(v))}</b></div>' for k, v in cards
    )


def _failures_table(failures: Sequence[TaskRecord]) -> str:
    if not failures:
        return "<p>No command failed.</p>"
    rows = []
    for f in failures[:FAILURES_SHOWN]:
        detail = f.message or (f.stderr_tail.strip().splitlines() or [""])[-1]
        command = f.text + (f"  (ran: {f.ran_text})" if f.ran_text else "")
        cells = (f.line, command, f.cause or "", f.exit_code, f.node or "", detail)
        rows.append(
            "<tr>"
            + "".join(
                f"<td><code>{html.escape(str(c))}</code></td>"
                if i == 1
                else f"<td>{html.escape('' if c is None else str(c))}</td>"
                for i, c in enumerate(cells)
            )
            + "</tr>"
        )
    more = (
        f"<p>… and {len(failures) - FAILURES_SHOWN} more (tbss-queue failures).</p>"
        if len(failures) > FAILURES_SHOWN
        else ""
    )
    return (
        '<table id="failures"><tr><th>line</th><th>command</th><th>cause</th><th>exit</th>'
        "<th>node</th><th>message</th></tr>" + "".join(rows) + "</table>" + more
    )


def render_html(
    status: BatchStatus,
    records: Sequence[TaskRecord],
    matrix: SubjectMatrix | None = None,
    data: dict[str, Any] | None = None,
) -> str:
    """The whole report: no scripts, no fonts or images fetched from anywhere. `data`:
    `report_data` of the same arguments, when the caller has it already."""
    data = data or report_data(status, records, matrix)
    css, subjects = _CSS, ""
    if matrix is not None:
        from .fsl.matrix_views import CSS, matrix_html

        css += CSS
        subjects = f"<h2>Subject matrix</h2>{matrix_html(matrix)}"
    timed = _timed(records)
    if timed:
        plots = (
            f'<h2>Throughput</h2><div id="throughput">{throughput_svg(timed)}</div>'
            f'<h2>Timeline</h2><div id="timeline">{timeline_svg(timed)}</div>'
            f'<h2>Durations</h2><div id="durations">{durations_svg(timed)}</div>'
        )
    else:
        plots = "<p>No command has finished yet: nothing to plot.</p>"
    failures = [r for r in records if r.state == "failed"]
    made = time.strftime("%Y-%m-%d %H:%M", time.localtime())
    title = f"tbss-queue batch {status.batch}"
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{css}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        f"<p><code>{html.escape(status.path)}</code> · report made {made}</p>"
        f'<div class="cards" id="summary">{_cards(data["summary"])}</div>'
        f"{subjects}{plots}"
        f"<h2>Failures ({len(failures)})</h2>{_failures_table(failures)}"
        "</body></html>\n"
    )
