"""The subject matrix of a `tbss_2_reg -n` study: one cell per (moving, reference) pair.

Each cell holds the pair's state in the batch and, once done, its `.msf` cost (the first of its
two numbers, what `tbss_3_postreg -S` averages). Counting failures per subject, as moving image
and as reference, names a broken subject: a corrupt FA image fails its whole row and column,
while the other subjects each fail only the pairs that involve it.

Only the commands decide whether a batch is such a study: all fsl_reg lines, every reference
one of the subjects. `-T`/`-t` batches (every subject to `target`) have no matrix.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tbss_queue.fsl.images import image_exists, imglob
from tbss_queue.fsl.outputs import FslReg, parse_fsl_reg, read_msf, reg_done
from tbss_queue.models import TaskRecord
from tbss_queue.opening import read_regular_path

MAX_CELLS = 40_000
"""Matrices of more cells than this (200 subjects) are not made: they would not be read."""
BROKEN_SHARE = 0.8
"""A subject is named broken when at least this share of its finished pairs failed, both as
moving image and as reference."""
DONE_STATES = ("succeeded", "skipped", "done before")
FINISHED_STATES = (*DONE_STATES, "failed")


@dataclass(frozen=True)
class Cell:
    """One registration: `moving` warped onto `reference`."""

    moving: str
    reference: str
    state: str  # a batch state, "done before" (done on disk, not in the batch) or "missing"
    cost: float | None = None  # first number of the .msf, once done
    line: int | None = None  # its line in the commands file
    detail: str = ""  # why it failed


@dataclass(frozen=True)
class SubjectCounts:
    """Failed and finished pairs of one subject, self-pair left out."""

    subject: str
    moving_failed: int
    moving_finished: int
    reference_failed: int
    reference_finished: int
    pairs: int  # pairs per side (subjects - 1)


@dataclass(frozen=True)
class SubjectMatrix:
    """The N x N grid (rows: moving image, columns: reference), counts and the verdict."""

    subjects: tuple[str, ...]
    cells: tuple[tuple[Cell, ...], ...]  # cells[i][j]: subjects[i] onto subjects[j]
    counts: tuple[SubjectCounts, ...]
    broken: tuple[str, ...]
    summary: tuple[str, ...]
    best_target: str | None = None
    best_from: str = ""  # "all.msf" or "scores"
    cost_range: tuple[float, float] | None = None  # lowest, highest cost off the diagonal
    target_exists: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["subjects"] = list(self.subjects)
        d["cells"] = [[asdict(c) for c in row] for row in self.cells]
        d["counts"] = [asdict(c) for c in self.counts]
        d["broken"] = list(self.broken)
        d["summary"] = list(self.summary)
        d["cost_range"] = list(self.cost_range) if self.cost_range else None
        return d


def short(subject: str) -> str:
    """A subject's name without tbss_1_preproc's `_FA` ending."""
    return subject[:-3] if subject.endswith("_FA") else subject


Pairs = dict[tuple[str, str], tuple[TaskRecord, FslReg]]


def study_pairs(records: Sequence[TaskRecord]) -> Pairs | None:
    """(moving, reference) -> its record and fsl_reg call, when the batch is an all-to-all
    fsl_reg study; None otherwise."""
    pairs: Pairs = {}
    for r in records:
        reg = parse_fsl_reg(r.argv)
        if reg is None:
            return None
        pairs[(os.path.basename(reg.input), os.path.basename(reg.reference))] = (r, reg)
    moving = {g for g, _ in pairs}
    references = {f for _, f in pairs}
    if len(references) < 2 or not references <= moving:
        return None
    return pairs


def subject_matrix(records: Sequence[TaskRecord], cwd: str) -> SubjectMatrix | None:
    """The matrix of an all-to-all study's commands (all of them, any state), reading the
    `.msf` scores under `cwd` where this host sees them; None for any other batch."""
    if len(records) > MAX_CELLS:
        return None
    pairs = study_pairs(records)
    if pairs is None:
        return None
    names = {g for g, _ in pairs} | {f for _, f in pairs}
    if os.path.isdir(cwd):  # pairs done before this batch (`plan` leaves them out)
        names |= set(imglob(Path(cwd)))
    subjects = tuple(sorted(names))
    if len(subjects) ** 2 > MAX_CELLS:  # a few references for many subjects: too wide to read
        return None
    cells = tuple(tuple(_cell(g, f, pairs.get((g, f)), cwd) for f in subjects) for g in subjects)
    counts = tuple(_counts(i, s, cells) for i, s in enumerate(subjects))
    broken = tuple(c.subject for c in counts if _broken(c))
    costs = [c.cost for i, row in enumerate(cells) for j, c in enumerate(row) if i != j and c.cost]
    best, best_from = _best_target(subjects, cells, cwd)
    target_exists = os.path.isdir(cwd) and image_exists(Path(cwd) / "target")
    if len(broken) > len(subjects) // 2:
        broken = ()  # most subjects fail: not their images
    matrix = SubjectMatrix(
        subjects=subjects,
        cells=cells,
        counts=counts,
        broken=broken,
        summary=(),
        best_target=best,
        best_from=best_from,
        cost_range=(min(costs), max(costs)) if costs else None,
        target_exists=target_exists,
    )
    return SubjectMatrix(**{**matrix.__dict__, "summary": _summary(matrix)})


def _cell(g: str, f: str, pair: tuple[TaskRecord, FslReg] | None, cwd: str) -> Cell:
    if pair is None:
        reg = FslReg(g, f, f"{g}_to_{f}")
        done = os.path.isdir(cwd) and reg_done(reg, cwd)
        return Cell(g, f, "done before" if done else "missing", _cost(reg, cwd) if done else None)
    record, reg = pair
    cost = _cost(reg, record.ran_cwd or cwd) if record.state in DONE_STATES else None
    detail = record.why if record.state == "failed" else ""
    return Cell(g, f, record.state, cost, record.line, detail)


def _cost(reg: FslReg, cwd: str) -> float | None:
    score = read_msf(reg.msf(cwd))
    return None if score is None else score[0]


def _counts(i: int, subject: str, cells: tuple[tuple[Cell, ...], ...]) -> SubjectCounts:
    row = [c for j, c in enumerate(cells[i]) if j != i]
    column = [row_[i] for j, row_ in enumerate(cells) if j != i]
    return SubjectCounts(
        subject,
        sum(c.state == "failed" for c in row),
        sum(c.state in FINISHED_STATES for c in row),
        sum(c.state == "failed" for c in column),
        sum(c.state in FINISHED_STATES for c in column),
        len(row),
    )


def _broken(c: SubjectCounts) -> bool:
    return (
        c.moving_failed > 0
        and c.reference_failed > 0
        and c.moving_failed >= BROKEN_SHARE * c.moving_finished
        and c.reference_failed >= BROKEN_SHARE * c.reference_finished
    )


def _best_target(
    subjects: tuple[str, ...], cells: tuple[tuple[Cell, ...], ...], cwd: str
) -> tuple[str | None, str]:
    """The target `best-target` chose (its all.msf), else the one the scores would give."""
    ranking = _all_msf(Path(cwd) / "all.msf")
    if ranking and {s for s, _ in ranking} == set(subjects):
        return min(ranking, key=lambda r: r[1])[0], "all.msf"
    costs = [[c.cost for c in row] for row in cells]
    if any(c is None for row in costs for c in row):
        return None, ""
    n = len(subjects)
    means = {f: sum(costs[i][j] or 0.0 for i in range(n)) / n for j, f in enumerate(subjects)}
    return min(subjects, key=lambda f: (means[f], f)), "scores"


ALL_MSF_CAP = 1 << 20
"""Bytes of FA/all.msf read at most: one short line per subject."""


def _all_msf(path: Path) -> list[tuple[str, float]]:
    """The ranking in `FA/all.msf`: subject, mean cost."""
    try:  # regular files only, never blocking (a FIFO planted as all.msf)
        lines = read_regular_path(str(path), ALL_MSF_CAP).decode().splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    ranking = []
    for line in lines:
        words = line.split()
        try:
            ranking.append((words[0], float(words[1])))
        except (IndexError, ValueError):
            return []
    return ranking


def _summary(m: SubjectMatrix) -> tuple[str, ...]:
    lines = []
    for c in m.counts:
        if c.subject in m.broken:
            lines.append(
                f"{short(c.subject)}: {c.moving_failed} of {c.moving_finished} pairs failed as "
                f"moving, {c.reference_failed} of {c.reference_finished} as reference: "
                "check its FA image"
            )
    states = [c.state for row in m.cells for c in row]
    failed = states.count("failed")
    explained = sum(
        c.state == "failed" and (c.moving in m.broken or c.reference in m.broken)
        for row in m.cells
        for c in row
    )
    if failed and not m.broken and sum(c.moving_failed > 0 for c in m.counts) > len(m.counts) // 2:
        lines.append(
            f"{failed} of {len(states)} pairs failed, across most subjects: not one image; "
            "see a failure's message (tbss-queue failures)"
        )
    elif failed > explained:
        lines.append(f"{failed - explained} other pairs failed (tbss-queue failures)")
    elif not failed:
        lines.append("no pair failed")
    done = sum(s in DONE_STATES for s in states)
    lines.append(f"{done} of {len(states)} pairs done")
    if m.best_target:
        how = (
            "best-target's choice (all.msf)"
            if m.best_from == "all.msf"
            else "lowest mean .msf cost; `tbss-queue best-target FA` writes all.msf"
        )
        lines.append(f"best target: {short(m.best_target)} ({how})")
    if m.target_exists:
        lines.append("FA/target exists: tbss_3_postreg -S will use it, not the best target")
    return tuple(lines)


STATE_COLOURS = {
    "failed": "#c62828",
    "running": "#1565c0",
    "queued": "#e0e0e0",
    "cancelled": "#616161",
    "missing": "#ffffff",
}
LOW_COST, HIGH_COST = (27, 94, 32), (220, 237, 200)
"""Done cells run from dark green (lowest cost: the best registrations) to pale green."""


def cell_colour(cell: Cell, cost_range: tuple[float, float] | None) -> str:
    """The cell's colour: its state, or for a done pair its cost within the study's range."""
    if cell.state not in DONE_STATES:
        return STATE_COLOURS.get(cell.state, "#9e9e9e")
    if cell.cost is None or cost_range is None:
        return "#2e7d32"
    lo, hi = cost_range
    t = 0.0 if hi <= lo else min(max((cell.cost - lo) / (hi - lo), 0.0), 1.0)
    r, g, b = (round(a + (z - a) * t) for a, z in zip(LOW_COST, HIGH_COST, strict=True))
    return f"#{r:02x}{g:02x}{b:02x}"
