"""The subject matrix drawn for people: an HTML table for the report, a rich table for the
terminal. Rows are the moving image, columns the reference; the best target's column is
marked with a star, a broken subject's name is in bold red."""

from __future__ import annotations

import html

from rich.console import Group
from rich.table import Table
from rich.text import Text

from tbss_queue.fsl.matrix import Cell, SubjectMatrix, cell_colour, short

CSS = """
#matrix table { width: auto; border-collapse: separate; border-spacing: 2px; }
#matrix td.cell { width: 1.9em; height: 1.9em; padding: 0; border: 1px solid #ccc;
  text-align: center; font-size: .7em; color: #fff; }
#matrix th { font-weight: normal; padding: 0 .4em; white-space: nowrap; }
#matrix th.col { writing-mode: vertical-rl; transform: rotate(180deg); text-align: left; }
#matrix .broken { color: #c62828; font-weight: bold; }
#matrix .best { font-weight: bold; }
#matrix .legend span { display: inline-block; width: 1em; height: 1em; margin: 0 .3em 0 1em;
  vertical-align: middle; border: 1px solid #ccc; }
"""

_LEGEND = (
    ("failed", "failed"),
    ("running", "running"),
    ("queued", "queued"),
    ("missing", "not in the batch"),
)


def _tip(c: Cell) -> str:
    text = f"{short(c.moving)} → {short(c.reference)}: {c.state}"
    if c.cost is not None:
        text += f", cost {c.cost:.4g}"
    if c.line is not None:
        text += f" (line {c.line})"
    return text + (f": {c.detail}" if c.detail else "")


def _name(m: SubjectMatrix, subject: str) -> tuple[str, str]:
    """The attributes and text of a subject's row or column heading."""
    cls = " broken" if subject in m.broken else ""
    cls += " best" if subject == m.best_target else ""
    star = " ★" if subject == m.best_target else ""
    return f'class="{cls.strip()}"', html.escape(short(subject) + star)


def matrix_html(m: SubjectMatrix) -> str:
    """The matrix section of the report: summary, grid, per-subject failure counts."""
    head = ""
    for s in m.subjects:
        attrs, text = _name(m, s)
        col = attrs.replace('class="', 'class="col ')
        head += f"<th {col}>{text}</th>"
    rows = []
    for i, s in enumerate(m.subjects):
        attrs, text = _name(m, s)
        cells = "".join(
            f'<td class="cell" data-state="{html.escape(c.state)}" title="{html.escape(_tip(c))}"'
            f' style="background:{cell_colour(c, m.cost_range)}">{"✕" * (c.state == "failed")}'
            "</td>"
            for c in m.cells[i]
        )
        k = m.counts[i]
        rows.append(
            f"<tr><th {attrs}>{text}</th>{cells}"
            f"<td>{k.moving_failed}/{k.moving_finished}</td>"
            f"<td>{k.reference_failed}/{k.reference_finished}</td></tr>"
        )
    lo, hi = m.cost_range or (0.0, 0.0)
    legend = "".join(
        f'<span style="background:{cell_colour(Cell("", "", state), None)}"></span>{label}'
        for state, label in _LEGEND
    )
    legend += (
        f'<span style="background:{cell_colour(Cell("", "", "succeeded", lo), m.cost_range)}">'
        f"</span>done, lowest cost {lo:.3g}"
        f'<span style="background:{cell_colour(Cell("", "", "succeeded", hi), m.cost_range)}">'
        f"</span>highest {hi:.3g}"
    )
    summary = "".join(f"<li>{html.escape(line)}</li>" for line in m.summary)
    return (
        '<div id="matrix">'
        f'<ul id="matrix-summary">{summary}</ul>'
        "<table><tr><th>moving ↓ / reference →</th>"
        f"{head}<th>failed as moving</th><th>failed as reference</th></tr>"
        + "".join(rows)
        + f'</table><p class="legend">{legend}</p></div>'
    )


GLYPHS = {"failed": "✕", "running": "…", "queued": "·", "missing": " "}
"""What a terminal cell shows (done: ✓), so the matrix reads without colour too."""


def matrix_table(m: SubjectMatrix) -> Table:
    """The matrix for a terminal: one coloured cell per pair (greener: lower cost)."""
    table = Table(
        box=None,
        padding=(0, 0),
        title="subject matrix (rows: moving, columns: reference; ★ best target)",
        title_justify="left",
    )
    heads = [("★" if s == m.best_target else "") + short(s) for s in m.subjects]
    width = max(len(h) for h in heads) + 1
    table.add_column("")
    for h in heads:
        table.add_column(h.rjust(width), justify="center", width=width)
    table.add_column(" failed mov/ref")
    for i, s in enumerate(m.subjects):
        name = Text(short(s) + " ", style="bold red" if s in m.broken else "")
        cells = []
        for c in m.cells[i]:
            glyph = GLYPHS.get(c.state, "✓")
            style = "" if c.state in ("queued", "missing") else f"on {cell_colour(c, m.cost_range)}"
            cells.append(Text(glyph.center(width), style=style))
        k = m.counts[i]
        moving = f"{k.moving_failed}/{k.moving_finished}"
        table.add_row(name, *cells, f" {moving} {k.reference_failed}/{k.reference_finished}")
    return table


NO_MATRIX = "no subject matrix: not a tbss_2_reg -n batch of fsl_reg lines"


def matrix_view(m: SubjectMatrix | None) -> Group:
    """`status --matrix`, once or under --watch: the grid, then the summary naming broken
    subjects; one line saying why there is none for any other batch."""
    if m is None:
        return Group(Text(NO_MATRIX))
    return Group(matrix_table(m), *(Text(line) for line in m.summary))
