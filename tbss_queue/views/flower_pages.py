"""Throughput and Batches pages inside the Flower that `tbss-queue flower` starts.

Flower 2 dropped 1.x's monitor graphs, and its own counts hold only the events it saw while it
ran. This adds two pages to Flower's own tornado application,
before it is built: a route in `flower.urls.handlers` (so `--url_prefix` applies to it), a
handler derived from Flower's (so `--basic_auth` and `--auth` guard it as every other page),
and a template loader that adds "Batches" and "Throughput" to Flower's navigation bar. Both are
drawn from our records in Redis: the batches with the very counts `status` gives (so they are
right for work done before Flower started), and the chart as inline SVG from
`throughput.throughput`. Nothing is fetched from anywhere; the pages reload every `refresh` s.
"""

from __future__ import annotations

import copy
import html
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from tornado import template, web

from tbss_queue.config import Settings
from tbss_queue.models import BatchStatus, NodeInfo
from tbss_queue.queue.batches import BatchStore
from tbss_queue.queue.keys import QUEUED, batch_key
from tbss_queue.queue.publish import study_name
from tbss_queue.views.throughput import Throughput, throughput

NAV_ITEM = """
        <li class="nav-item">
          <a class="nav-link{% if active_tab == 'batches' %} active{% end %}"
            id="nav-batches" href="{{ reverse_url('batches') }}"
            {% if active_tab == 'batches' %}aria-current="page"{% end %}>Batches</a>
        </li>
        <li class="nav-item">
          <a class="nav-link{% if active_tab == 'throughput' %} active{% end %}"
            id="nav-throughput" href="{{ reverse_url('throughput') }}"
            {% if active_tab == 'throughput' %}aria-current="page"{% end %}>Throughput</a>
        </li>
"""

PAGE = """{% extends "base.html" %}
{% block title %}Throughput · Flower{% end %}
{% block navbar %}{% module Template("navbar.html", active_tab="throughput") %}{% end %}
{% block container %}
<div class="page-section" id="throughput-page">
  <header class="page-header mb-2"><div>
    <p class="page-eyebrow">Commands finished per minute</p>
    <p class="page-description" id="throughput-caption">{{ caption }}</p>
  </div></header>
  <div id="throughput-chart">{% raw chart %}</div>
  <table class="table table-sm" id="throughput-nodes" style="max-width: 50em">
    <thead><tr><th>node</th><th>commands</th><th>per minute, last bin</th>
      <th>per minute, shown period</th></tr></thead>
    <tbody>{% for row in rows %}<tr>{% for cell in row %}<td>{{ cell }}</td>{% end %}</tr>
    {% end %}</tbody>
  </table>
  <p class="text-body-secondary">From tbss-queue's records in Redis (each batch's end times
    and the node of each command's last attempt), not from Flower's own task list.</p>
</div>
{% end %}
{% block extra_scripts %}
{% if refresh %}<script>setTimeout(function () { location.reload(); }, {{ refresh }} * 1000);
</script>{% end %}
{% end %}
"""

BATCH_COLUMNS = (
    "batch", "study", "file", "submitted", "total", "queued", "running", "succeeded", "failed",
    "skipped", "cancelled", "state",
)  # fmt: skip

BATCHES_PAGE = """{% extends "base.html" %}
{% block title %}Batches · Flower{% end %}
{% block navbar %}{% module Template("navbar.html", active_tab="batches") %}{% end %}
{% block container %}
<div class="page-section" id="batches-page">
  <header class="page-header mb-2"><div>
    <p class="page-eyebrow">Batches on this broker, as tbss-queue status counts them</p>
    <p class="page-description" id="batches-caption">{{ caption }}</p>
  </div></header>
  <table class="table table-sm" id="batches-table">
    <thead><tr>{% for col in columns %}<th>{{ col }}</th>{% end %}</tr></thead>
    <tbody>{% for bid, row in rows %}<tr id="batch-{{ bid }}">{% for col, cell in row %}
      <td class="{{ col }}">{{ cell }}</td>{% end %}</tr>
    {% end %}</tbody>
  </table>
  <table class="table table-sm" id="nodes-table" style="max-width: 60em">
    <thead><tr>{% for col in node_columns %}<th>{{ col }}</th>{% end %}</tr></thead>
    <tbody>{% for name, row in node_rows %}<tr id="node-{{ name }}">{% for col, cell in row %}
      <td class="{{ col }}">{{ cell }}</td>{% end %}</tr>
    {% end %}</tbody>
  </table>
  <p class="text-body-secondary">From tbss-queue's records in Redis, not from Flower's own task
    list (which holds only what happened while Flower ran). A command counts once, in its
    current state; a message dropped as a duplicate is not a command.</p>
</div>
{% end %}
{% block extra_scripts %}
{% if refresh %}<script>setTimeout(function () { location.reload(); }, {{ refresh }} * 1000);
</script>{% end %}
{% end %}
"""

SINCE_NOTE = """
      <p class="page-description" id="tbssq-since">Counts and tasks since this Flower started
        (Flower sees only the events sent while it runs): every batch, from its start, with the
        counts of <code>tbss-queue status</code>, is on
        <a href="{{ reverse_url('batches') }}">Batches</a>.</p>"""
EYEBROWS = (
    '<p class="page-eyebrow">Cluster overview</p>',
    '<p class="page-eyebrow">Task history</p>',
)
"""Where Flower's Workers and Tasks pages start: the note goes under them."""

WRAP_STYLE = """
<style>/* tbss-queue: a task's name (pair · batch · study) wraps between its words, and long
exception text wraps inside its cell instead of running off the page */
#tasks-table td:nth-child(1) { min-width: 16em; white-space: normal; }
#tasks-table td.text-nowrap:nth-child(7), #task-page td { white-space: normal !important;
  overflow-wrap: anywhere; min-width: 12em; }</style>
"""

COLOURS = ("#1565c0", "#2e7d32", "#ef6c00", "#6a1b9a", "#00838f", "#ad1457", "#5d4037")


class PagesLoader(template.Loader):
    """Flower's templates, with our navigation entry and our page added."""

    def _create_template(self, name: str) -> template.Template:
        if name == "tbssq_throughput.html":
            return template.Template(PAGE, name=name, loader=self)
        if name == "tbssq_batches.html":
            return template.Template(BATCHES_PAGE, name=name, loader=self)
        if name in ("workers.html", "tasks.html"):
            text = (Path(self.root) / name).read_text()
            for eyebrow in EYEBROWS:
                text = text.replace(eyebrow, eyebrow + SINCE_NOTE, 1)
            return template.Template(text, name=name, loader=self)
        if name == "navbar.html":
            text = (Path(self.root) / name).read_text()
            at = text.index("</ul>")  # the end of Flower's Workers / Tasks / Broker list
            text = text[:at] + NAV_ITEM + text[at:] + WRAP_STYLE
            return template.Template(text, name=name, loader=self)
        return super()._create_template(name)


def _handler(client: redis.Redis) -> type[web.RequestHandler]:
    """The page's handler: Flower's BaseHandler gives it Flower's authentication."""
    from flower.views import BaseHandler

    class ThroughputPage(BaseHandler):
        @web.authenticated
        def get(self) -> None:
            minutes = float(self.get_argument("minutes", "60"))
            refresh = int(self.get_argument("refresh", "10"))
            data = throughput(BatchStore(client), minutes=minutes)
            if self.get_argument("json", ""):
                self.write(data.to_dict())
                return
            self.render(
                "tbssq_throughput.html",
                caption=caption(data),
                chart=chart_svg(data),
                rows=node_rows(data),
                refresh=refresh,
            )

    return ThroughputPage


def _batches_handler(
    batches: Callable[[], list[BatchStatus]], nodes: Callable[[], list[NodeInfo]]
) -> type[web.RequestHandler]:
    """The Batches page's handler: `batches()` (`api.list_batches`), the figures `status`
    prints, and `nodes()` (`api.nodes`), the nodes' states as `tbss-queue nodes` shows them
    (Flower's Workers page knows only online or offline, not paused and why)."""
    from flower.views import BaseHandler

    class BatchesPage(BaseHandler):
        @web.authenticated
        def get(self) -> None:
            refresh = int(self.get_argument("refresh", "10"))
            items, fleet = batches(), nodes()
            if self.get_argument("json", ""):
                self.write(
                    {"batches": [b.to_dict() for b in items], "nodes": [n.to_dict() for n in fleet]}
                )
                return
            self.render(
                "tbssq_batches.html",
                caption=batches_caption(items),
                columns=BATCH_COLUMNS,
                rows=[(b.batch, batch_row(b)) for b in reversed(items)],
                node_columns=NODE_COLUMNS,
                node_rows=[(n.node, node_row(n)) for n in fleet],
                refresh=refresh,
            )

    return BatchesPage


DUPLICATE = "DUPLICATE"
"""What the Tasks page calls a message its worker dropped because its command had ended or ran
elsewhere (Celery's Ignore sends no event, so Flower would show it RECEIVED for ever)."""


BATCH_IN_NAME = re.compile(r" · batch ([0-9a-f]+) · ")
"""The batch in a task's name (publish.shadow_name): Flower's events carry no arguments."""


def message_state(client: redis.Redis, name: str) -> str | None:
    """DUPLICATE for a message Flower still shows as received or started whose batch, by our
    records, has nothing queued or running: it runs nothing, whatever Flower last heard. None
    while the batch goes on (a runner may wait a while for an earlier one's lease: only the
    batch's end tells for sure), or for a name that is not ours."""
    found = BATCH_IN_NAME.search(name or "")
    if found is None:
        return None
    queued, running = client.hmget(batch_key(found.group(1), "counts"), QUEUED, "running")
    return None if int(queued or 0) or int(running or 0) else DUPLICATE


def _tasks_table(client: redis.Redis) -> type[web.RequestHandler]:
    """Flower's Tasks table, with a dropped duplicate message said to be one."""
    from flower.views.tasks import TasksDataTable

    class TasksTable(TasksDataTable):
        def format_task(self, task: tuple[str, Any]) -> tuple[str, Any]:
            uuid, shown = super().format_task(task)
            if getattr(shown, "state", None) in ("RECEIVED", "STARTED"):
                with_state = message_state(client, getattr(shown, "name", ""))
                if with_state is not None:
                    shown = shown if shown is not task[1] else copy.copy(shown)
                    shown.state = with_state
            return uuid, shown

    return TasksTable


def _workers_view() -> type[web.RequestHandler]:
    """Flower's Workers page, with an offline worker running nothing: Flower keeps the active
    count of its last heartbeat, so a node that went down mid-command showed "Offline, 1
    active" (its command goes back to the queue when its lease lapses: status says so)."""
    from flower.views.workers import WorkersView

    class Workers(WorkersView):
        @classmethod
        def _as_dict(cls, worker: Any) -> dict[str, Any]:
            info = dict(super()._as_dict(worker))
            if not worker.alive:
                info["active"] = 0
            return info

    return Workers


def install(
    client: redis.Redis,
    settings: Settings,
    batches: Callable[[], list[BatchStatus]],
    nodes: Callable[[], list[NodeInfo]] = list,
) -> None:
    """Add the pages to Flower's routes and navigation; call before Flower starts."""
    from flower import urls

    named = {getattr(h, "name", None) for h in urls.handlers}
    # before the last route, Flower's catch-all 404
    if "throughput" not in named:
        urls.handlers.insert(-1, web.url(r"/throughput", _handler(client), name="throughput"))
    if "batches" not in named:
        urls.handlers.insert(
            -1, web.url(r"/batches", _batches_handler(batches, nodes), name="batches")
        )
    for i, h in enumerate(urls.handlers):
        pattern = getattr(getattr(h, "regex", None), "pattern", None)
        if pattern == "/tasks/datatable$":
            urls.handlers[i] = web.url(r"/tasks/datatable", _tasks_table(client))
        elif pattern in ("/$", "/workers$"):
            urls.handlers[i] = web.url(pattern[:-1], _workers_view(), name=h.name)
    urls.settings["template_loader"] = PagesLoader(urls.settings["template_path"])


def batch_row(b: BatchStatus) -> list[tuple[str, str]]:
    """One batch as the page shows it: the counts of `status`, its study, how it stands."""
    from tbss_queue.views.progress import fmt_duration

    if b.done:
        state = "ended" + (f" {_clock(b.last_ended)}" if b.last_ended is not None else "")
    else:
        state = f"running · ETA {fmt_duration(b.eta_seconds)}"
    cells = {
        "batch": b.batch,
        "study": study_name(b.cwd),
        "file": b.path,
        "submitted": time.strftime("%Y-%m-%d %H:%M", time.localtime(b.submitted)),
        "state": state,
        **{c: str(getattr(b, c)) for c in BATCH_COLUMNS[4:-1]},
    }
    return [(col, cells[col]) for col in BATCH_COLUMNS]


NODE_COLUMNS = ("node", "state", "running", "why")


def node_row(n: NodeInfo) -> list[tuple[str, str]]:
    """One node as the Batches page shows it: its state and why (paused, quarantined)."""
    why = "; ".join([*(s for s in (n.quarantined, n.paused) if s), *n.cannot])
    cells = {"node": n.node, "state": n.state, "running": str(len(n.running)), "why": why}
    return [(col, cells[col]) for col in NODE_COLUMNS]


def batches_caption(items: list[BatchStatus]) -> str:
    if not items:
        return "No batch on this broker yet."
    running = sum(not b.done for b in items)
    return f"{len(items)} batches, {running} running · updated {time.strftime('%H:%M:%S')}"


def _clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts))


def caption(t: Throughput) -> str:
    which = ", ".join(t.batches) or "none"
    if not t.batches:
        return "No batch on this broker yet."
    state = "running batches" if t.live else "no batch is running; the latest batch"
    return (
        f"{state}: {which} · {t.total} commands finished in the period shown · "
        f"bins of {t.bin_seconds} s · updated {time.strftime('%H:%M:%S')}"
    )


def node_rows(t: Throughput) -> list[tuple[str, ...]]:
    span_min = max(len(t.overall) * t.bin_seconds / 60.0, 1e-9)
    rows = [("all nodes", t.overall), *((n, c) for n, c in t.nodes.items())]
    return [
        (name, str(sum(c)), f"{t.per_minute(c)[-1]:.1f}" if c else "0", f"{sum(c) / span_min:.1f}")
        for name, c in rows
    ]


def _nice_max(value: float) -> float:
    for step in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000, 10000):
        if value <= step:
            return float(step)
    return float(value)


def chart_svg(t: Throughput, width: int = 960, height: int = 360) -> str:
    """Lines of commands per minute: overall (thick) and one per node, with a legend."""
    if not t.overall:
        return '<p id="throughput-empty">No command has finished yet: nothing to plot.</p>'
    left, right, top, bottom = 56, 190, 16, 40
    w, h = width - left - right, height - top - bottom
    series: list[tuple[str, list[float], str, float]] = [
        ("all nodes", t.per_minute(t.overall), "#212121", 3.0)
    ]
    for i, (node, counts) in enumerate(t.nodes.items()):
        series.append((node, t.per_minute(counts), COLOURS[i % len(COLOURS)], 1.8))
    top_value = _nice_max(max(max(s[1]) for s in series))
    n = len(t.overall)

    def x(i: int) -> float:
        return left + (w * (i + 0.5) / n)

    def y(v: float) -> float:
        return top + h - h * v / top_value

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="commands per minute" '
        'font-family="sans-serif" font-size="12">',
        f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#bbb"/>',
    ]
    for k in range(5):
        v = top_value * k / 4
        parts.append(
            f'<line x1="{left}" x2="{left + w}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#eee"/>'
            f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:g}</text>'
        )
    for i in range(0, n, max(1, n // 8)):
        end = t.start + (i + 1) * t.bin_seconds
        label = time.strftime("%H:%M:%S", time.localtime(end))
        parts.append(f'<text x="{x(i):.1f}" y="{top + h + 16}" text-anchor="middle">{label}</text>')
    parts.append(
        f'<text x="14" y="{top + h / 2}" transform="rotate(-90 14 {top + h / 2})" '
        'text-anchor="middle">commands / minute</text>'
    )
    for k, (name, values, colour, stroke) in enumerate(series):
        points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(values))
        parts.append(
            f'<polyline class="series" data-node="{html.escape(name)}" points="{points}" '
            f'fill="none" stroke="{colour}" stroke-width="{stroke}"/>'
        )
        ly = top + 14 + 18 * k
        parts.append(
            f'<line x1="{left + w + 12}" x2="{left + w + 36}" y1="{ly - 4}" y2="{ly - 4}" '
            f'stroke="{colour}" stroke-width="{stroke}"/>'
            f'<text x="{left + w + 42}" y="{ly}">{html.escape(name)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)
