"""A batch's report: numbers and plots in one self-contained HTML file, for a lab meeting.

Everything comes from the batch's run log, a line per recorded attempt (line, node, slot, start,
end, state) that finish.lua appends, read as columns, and from its set of failed commands; not
from Flower, so a report can be made any time while the records are kept.
The plots are matplotlib SVG with text kept as text (searchable, sharp at any zoom); with very
many commands the timeline's bars are drawn as an embedded image to keep the file small.
"""

from __future__ import annotations

import html
import io
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib import rc_context
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure

from tbss_queue.fsl.matrix import SubjectMatrix
from tbss_queue.models import BatchStatus, TaskRecord
from tbss_queue.sizes import human
from tbss_queue.views.progress import fmt_duration, plural
from tbss_queue.views.report_failures import failed_attempts, failures_said, failures_table
from tbss_queue.views.throughput import bin_count

STATE_COLOURS = {"succeeded": "#2e7d32", "failed": "#c62828"}
OTHER_COLOUR = "#9e9e9e"
RASTERIZE_ABOVE = 20_000
"""Timeline bars beyond which the Gantt chart is embedded as an image, not SVG shapes."""


STATE_CODES = {"succeeded": 0, "failed": 1}
OTHER_CODE = 2
_STATE_LOOKUP: defaultdict[str, int] = defaultdict(lambda: OTHER_CODE, STATE_CODES)


@dataclass(frozen=True)
class Runs:
    """Every recorded attempt of a batch, as columns (a million of them plot in a second):
    line, slot row (an index into `rows`, each a (node, slot)), state code, start and end."""

    line: np.ndarray
    row: np.ndarray
    state: np.ndarray
    started: np.ndarray
    ended: np.ndarray
    rows: tuple[tuple[str, int], ...]

    @classmethod
    def parse(cls, lines: Sequence[str]) -> Runs:
        """From run-log lines: line, node, slot, started, ended, state (queue.keys.RUN_FIELDS),
        split and converted column by column (a million lines in well under a second)."""
        if not lines:
            empty = np.empty(0)
            return cls(empty.astype(np.int64), empty.astype(np.int32), empty.astype(np.int8),
                       empty, empty, ())  # fmt: skip
        n = len(lines)
        # one split of all lines joined: a split per line costs ten times as much
        fields = "\t".join(lines).split("\t")
        line, node, slot, started, ended, state = (fields[k::6] for k in range(6))
        index: dict[tuple[str, str], int] = {}
        row = [index.setdefault(key, len(index)) for key in zip(node, slot, strict=True)]
        return cls(
            np.fromiter(map(int, line), np.int64, n),
            np.fromiter(row, np.int32, n),
            np.fromiter(map(_STATE_LOOKUP.__getitem__, state), np.int8, n),
            np.fromiter(map(float, started), np.float64, n),
            np.fromiter(map(float, ended), np.float64, n),
            tuple((name, int(s)) for name, s in index),
        )

    def __len__(self) -> int:
        return len(self.line)

    @property
    def durations(self) -> np.ndarray:
        return self.ended - self.started


def _row_label(node: str, slot: int) -> str:
    return f"{node} #{slot}" if slot >= 0 else node


_STATE_NAMES = {code: name for name, code in STATE_CODES.items()} | {OTHER_CODE: "other"}


def _unit(span: float) -> tuple[float, str]:
    """Seconds per plotted unit and its name, for a time axis covering `span` seconds."""
    if span > 3 * 3600:
        return 3600.0, "hours"
    if span > 180:
        return 60.0, "minutes"
    return 1.0, "seconds"


def report_data(
    status: BatchStatus,
    runs: Runs,
    failures: Sequence[TaskRecord],
    matrix: SubjectMatrix | None = None,
    *,
    timeline: bool = True,
) -> dict[str, Any]:
    """What the report shows, as plain data (what `report --json` prints); `matrix`: the
    subject matrix of a `tbss_2_reg -n` study (fsl/matrix.py), None for other batches;
    `timeline`: False leaves out the entry per attempt (a million dicts take a second), for
    callers that only want the HTML."""
    durations = runs.durations
    # wall time and rate: status's one definition (first start to the end, frozen once ended)
    makespan = status.elapsed_seconds or 0.0
    busy = float(durations.sum())
    slots = len(runs.rows)
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
        "nodes": len({node for node, _ in runs.rows}),
        "slots": slots,
        "makespan_seconds": round(makespan, 3),
        "median_seconds": round(float(np.median(durations)), 3) if len(runs) else None,
        "mean_seconds": round(float(durations.mean()), 3) if len(runs) else None,
        "max_seconds": round(float(durations.max()), 3) if len(runs) else None,
        # share of slot time spent running commands: 1.0 means no slot was ever idle
        "utilisation": round(busy / (makespan * slots), 4) if makespan and slots else None,
        "per_minute": status.rate_overall if makespan else None,
        "per_minute_recent": status.rate_recent,
        "eta_seconds": status.eta_seconds,
        "requeued": status.requeued,
        "lost": status.lost,
        "peak_rss": status.peak_rss,  # bytes: the largest attempt's process tree
        **failed_attempts(
            runs.line[runs.state == STATE_CODES["failed"]],
            runs.line[runs.state == STATE_CODES["succeeded"]],
            failures,
        ),
        # each node's state when the report was made (not its heartbeat's age, which ticks)
        "node_health": [
            {k: v for k, v in n.to_dict().items() if k != "heartbeat_age"} for n in status.nodes
        ],
    }
    return {
        "summary": summary,
        # one entry per recorded attempt, by start
        "timeline": _timeline(runs) if timeline else None,
        "failures": [r.to_dict() for r in failures],
        "matrix": matrix.to_dict() if matrix is not None else None,
        "throughput": _bins(runs) if len(runs) else None,
    }


def _bins(runs: Runs) -> dict[str, Any]:
    """The throughput chart's bins: a few attempts' ends each (`throughput.bin_count`),
    together exactly the batch's length, each bar the rate per minute within its bin."""
    t0 = float(runs.started.min())
    span = max(float(runs.ended.max()) - t0, 1.0)
    n_bins = bin_count(len(runs), most=60)
    width = span / n_bins
    where = np.minimum(((runs.ended - t0) // width).astype(np.int64), n_bins - 1)
    counts = np.bincount(where, minlength=n_bins)
    return {
        "start": t0,
        "span_seconds": span,
        "bin_seconds": width,
        "counts": counts.tolist(),
        "per_minute": (counts * 60 / width).round(3).tolist(),
    }


def _timeline(runs: Runs) -> list[dict[str, Any]]:
    order = np.argsort(runs.started, kind="stable")
    rows = runs.rows
    return [
        {
            "line": ln,
            "node": rows[r][0],
            "slot": rows[r][1],
            "state": _STATE_NAMES[st],
            "started": t0,
            "ended": t1,
        }
        for ln, r, st, t0, t1 in zip(
            runs.line[order].tolist(),
            runs.row[order].tolist(),
            runs.state[order].tolist(),
            runs.started[order].tolist(),
            runs.ended[order].tolist(),
            strict=True,
        )
    ]


def _svg(fig: Figure) -> str:
    buf = io.StringIO()
    with rc_context({"svg.fonttype": "none", "svg.hashsalt": "tbss-queue"}):
        fig.savefig(buf, format="svg", bbox_inches="tight")
    text = buf.getvalue()
    return text[text.index("<svg") :]


def timeline_svg(runs: Runs) -> str:
    """A Gantt chart: one row per worker slot, one bar per attempt; gaps are idle time."""
    order = sorted(range(len(runs.rows)), key=lambda i: runs.rows[i])
    position = np.empty(len(runs.rows), dtype=np.int32)
    position[order] = np.arange(len(order))
    t0 = float(runs.started.min())
    span = float(runs.ended.max()) - t0
    scale, unit = _unit(span)
    fig = Figure(figsize=(10, 1.2 + 0.28 * len(order)))
    ax = fig.add_subplot()
    where = position[runs.row]
    if len(runs) <= RASTERIZE_ABOVE:
        for code in np.unique(runs.state):
            colour = STATE_COLOURS.get(_STATE_NAMES[int(code)], OTHER_COLOUR)
            for row in np.unique(where[runs.state == code]):
                mine = (runs.state == code) & (where == row)
                bars = list(
                    zip(
                        ((runs.started[mine] - t0) / scale).tolist(),
                        (runs.durations[mine] / scale).tolist(),
                        strict=True,
                    )
                )
                ax.broken_barh(bars, (row - 0.4, 0.8), facecolors=colour)
    else:
        ax.imshow(
            _occupancy(runs, where, len(order), t0, span),
            aspect="auto",
            interpolation="nearest",
            extent=(0, span / scale, len(order) - 0.5, -0.5),
        )
    ax.set_yticks(range(len(order)), [_row_label(*runs.rows[i]) for i in order])
    if len(runs) <= RASTERIZE_ABOVE:
        ax.invert_yaxis()
    ax.set_xlabel(f"{unit} since the first command started")
    ax.set_title("Every command on every worker slot (green: succeeded, red: failed)")
    ax.set_xlim(0, max(span / scale, 1e-9))
    return _svg(fig)


TIMELINE_PIXELS = 1600
"""Columns of the timeline's image when it has too many bars for SVG shapes."""


def _occupancy(runs: Runs, where: np.ndarray, n_rows: int, t0: float, span: float) -> np.ndarray:
    """The timeline as an RGB image, a row per slot and a column per time step: each pixel
    the colour of the state that occupied that slot then (white: idle)."""
    width = TIMELINE_PIXELS
    x0 = np.clip(((runs.started - t0) / max(span, 1e-9) * width).astype(np.int64), 0, width - 1)
    x1 = np.clip(((runs.ended - t0) / max(span, 1e-9) * width).astype(np.int64) + 1, 1, width)
    image = np.ones((n_rows, width, 3))
    for code in (OTHER_CODE, STATE_CODES["succeeded"], STATE_CODES["failed"]):
        mine = runs.state == code
        if not mine.any():
            continue
        edges = np.zeros((n_rows, width + 1), dtype=np.int64)
        np.add.at(edges, (where[mine], x0[mine]), 1)
        np.add.at(edges, (where[mine], x1[mine]), -1)
        busy = np.cumsum(edges, axis=1)[:, :width] > 0
        image[busy] = to_rgb(STATE_COLOURS.get(_STATE_NAMES[code], OTHER_COLOUR))
    return image


def throughput_svg(runs: Runs, bins: dict[str, Any] | None = None) -> str:
    """Attempts finished per minute over time, in bins that fit the batch (`_bins`), and the
    overall average."""
    bins = bins or _bins(runs)
    span, width = bins["span_seconds"], bins["bin_seconds"]
    scale, unit = _unit(span)
    edges = np.arange(len(bins["counts"]) + 1) * width / scale
    fig = Figure(figsize=(10, 3))
    ax = fig.add_subplot()
    ax.stairs(bins["per_minute"], edges, fill=True, color="#1565c0", alpha=0.6, label="per bin")
    ax.axhline(60 * len(runs) / span, color="#0d47a1", linestyle="--", label="overall")
    ax.set_xlabel(f"{unit} since the first command started")
    ax.set_ylabel("commands / minute")
    ax.set_title("Throughput")
    ax.legend(loc="upper right")
    return _svg(fig)


def _bins_said(bins: dict[str, Any]) -> str:
    ended, n, width = sum(bins["counts"]), len(bins["counts"]), bins["bin_seconds"]
    each = f"{width:.1f} s" if width < 10 else fmt_duration(width)  # not 0.6 s called "1s"
    return f"<p>{plural(ended, 'attempt')} ended, in {plural(n, 'bin')} of {each}</p>"


def durations_svg(runs: Runs) -> str:
    """How long commands took, succeeded and failed stacked."""
    durations = runs.durations
    scale, unit = _unit(float(durations.max()))
    groups = {
        state: durations[runs.state == STATE_CODES[state]] / scale
        for state in ("succeeded", "failed")
    }
    groups = {k: v for k, v in groups.items() if len(v)}
    # binned by numpy, drawn as stacked steps: matplotlib's own hist takes ten times as long
    edges = np.histogram_bin_edges(durations / scale, bins=40)
    fig = Figure(figsize=(10, 3))
    ax = fig.add_subplot()
    bottom = np.zeros(len(edges) - 1)
    for state, values in groups.items():
        counts = np.histogram(values, bins=edges)[0]
        top = bottom + counts
        ax.stairs(top, edges, baseline=bottom, fill=True, color=STATE_COLOURS[state], label=state)
        bottom = top
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
td { overflow-wrap: anywhere; }
svg { max-width: 100%; height: auto; }
"""


def _cards(summary: dict[str, Any]) -> str:
    def pct(x: float | None) -> str:
        return "?" if x is None else f"{100 * x:.1f}%"

    cards = [
        ("commands", summary["total"]),
        ("succeeded", summary["succeeded"]),
        ("failed", summary["failed"]),
        ("failed attempts", summary["failed_attempts"]),
        ("skipped", summary["skipped"]),
        ("cancelled", summary["cancelled"]),
        ("still queued or running", summary["queued"] + summary["running"]),
        ("worker nodes / slots", f"{summary['nodes']} / {summary['slots']}"),
        ("wall time", fmt_duration(summary["makespan_seconds"])),
        ("median command", fmt_duration(summary["median_seconds"])),
        (
            "commands / minute",
            "?" if summary["per_minute"] is None else f"{summary['per_minute']:.1f}",
        ),
        ("slot utilisation", pct(summary["utilisation"])),
        ("peak memory of a command", human(summary["peak_rss"]) if summary["peak_rss"] else "?"),
    ]
    return "".join(
        f'<div class="card">{html.escape(k)}<b>{html.escape(str(v))}</b></div>' for k, v in cards
    )


def render_html(
    status: BatchStatus,
    runs: Runs,
    failures: Sequence[TaskRecord],
    matrix: SubjectMatrix | None = None,
    data: dict[str, Any] | None = None,
) -> str:
    """The whole report: no scripts, no fonts or images fetched from anywhere. `data`:
    `report_data` of the same arguments, when the caller has it already."""
    data = data or report_data(status, runs, failures, matrix, timeline=False)
    css, subjects = _CSS, ""
    if matrix is not None:
        from tbss_queue.fsl.matrix_views import CSS, matrix_html

        css += CSS
        subjects = f"<h2>Subject matrix</h2>{matrix_html(matrix)}"
    if len(runs):
        bins = data["throughput"] or _bins(runs)
        plots = (
            f'<h2>Throughput</h2><div id="throughput">{throughput_svg(runs, bins)}'
            f"{_bins_said(bins)}</div>"
            f'<h2>Timeline</h2><div id="timeline">{timeline_svg(runs)}</div>'
            f'<h2>Durations</h2><div id="durations">{durations_svg(runs)}</div>'
        )
    else:
        plots = "<p>No command has finished yet: nothing to plot.</p>"
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
        "<h2>Failures</h2>"  # a count here read as "none" above a timeline of red attempts
        f"{failures_said(data['summary'], len(failures))}{failures_table(failures)}"
        "</body></html>\n"
    )
