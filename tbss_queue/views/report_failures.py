"""The report's failures section: every failed attempt counted with what became of it, and
the commands failed now, said in the words every view uses (`causes`)."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import numpy as np

from tbss_queue.models import TaskRecord
from tbss_queue.sizes import human
from tbss_queue.views.causes import in_words, last_line
from tbss_queue.views.progress import plural

FAILURES_SHOWN = 1000


def failed_attempts(
    failed_lines: np.ndarray, succeeded_lines: np.ndarray, failures: Sequence[TaskRecord]
) -> dict[str, int]:
    """The failed attempts in the run log (`failed_lines`: the line of each; `succeeded_lines`:
    of each succeeded one), by what became of their command: succeeded on a later attempt,
    failed now, or neither yet (queued or running again). A batch that recovered by retries
    is not one where nothing failed. (A failure retried by `--retries` is there too: its
    hand-back writes its line.)"""
    lines, counts = np.unique(failed_lines, return_counts=True)
    per_line = dict(zip(lines.tolist(), counts.tolist(), strict=True))
    ended_ok = np.unique(succeeded_lines)
    failed_now = np.array(sorted({f.line for f in failures}), dtype=np.int64)
    then_ok = sum(per_line[x] for x in np.intersect1d(lines, ended_ok).tolist())
    still = sum(per_line[x] for x in np.intersect1d(lines, failed_now).tolist())
    return {
        "failed_attempts": len(failed_lines),
        "failed_then_succeeded": then_ok,
        "failed_still_failed": still,
        "failed_being_retried": len(failed_lines) - then_ok - still,
    }


def failures_said(summary: dict[str, Any], failed_now: int) -> str:
    """The sentence above the failures table: how many commands are failed now, and every
    failed attempt with what became of it."""
    now = (
        f"{plural(failed_now, 'command')} failed now."
        if failed_now
        else "No command is failed now."
    )
    n = summary["failed_attempts"]
    if not n:
        return f"<p>{now} No attempt failed.</p>"
    fates = [
        (summary["failed_then_succeeded"], "failed, then succeeded on retry"),
        (summary["failed_still_failed"], "by commands that are still failed"),
        (summary["failed_being_retried"], "by commands queued or running again"),
    ]
    said = "; ".join(f"{k} {words}" for k, words in fates if k)
    return f"<p>{now} {plural(n, 'failed attempt')}: {said}.</p>"


def failures_table(failures: Sequence[TaskRecord]) -> str:
    if not failures:
        return ""
    rows = []
    for f in failures[:FAILURES_SHOWN]:
        command = f.text + (f"  (ran: {f.ran_text})" if f.ran_text else "")
        peak = human(f.peak_rss) if f.peak_rss else ""
        cells = (
            f.line, command, in_words(f), f.exit_code, f.node or "", peak,
            last_line(f.stderr_tail),
        )  # fmt: skip
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
        "<th>node</th><th>peak memory</th><th>stderr (last line)</th></tr>"
        + "".join(rows)
        + "</table>"
        + more
    )
