"""Every attempt's stdout and stderr in files, one command away; a GNU parallel joblog.

The worker streams a command's output straight into two files in the batch's log directory,
`<cwd>/.tbss-queue/logs/<batch>/` (cwd: the directory the commands ran in, FA/ for TBSS, the
one holding the commands file unless `submit --cwd`), named by line and attempt, with the pair
for fsl_reg: `12.1.out`, `12.1.err`, `7.2.sub05_FA_to_sub01_FA.err`. Only the tails stay in
the record, as before. A batch given a log directory by fsl_sub's `-l` keeps fsl_sub's names
there instead (one file per task, the last attempt's), never both.

The directory lies under the command's cwd, which the worker has already checked against its
`--root`s: the files are opened with `fields.open_logs` (no symlink followed below the anchor).
A node that cannot write them still runs the command, with the output in temporary files as
before; its record says why (`log_error`) and `tbss-queue logs` shows the record's tails.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from tbss_queue.errors import ConfigError
from tbss_queue.execution.fields import TaskFields, log_paths
from tbss_queue.fsl.matrix import short
from tbss_queue.fsl.outputs import parse_fsl_reg
from tbss_queue.models import TaskRecord
from tbss_queue.queue.batches import BatchStore
from tbss_queue.queue.keys import CHUNK, batch_key
from tbss_queue.queue.publish import task_kwargs, with_line
from tbss_queue.views.causes import describe

log = logging.getLogger(__name__)

_PAIR = re.compile(r"\s*(.+?)\s*(?:→|->|,)\s*(.+?)\s*")
_OUTPUT = re.compile(r"\s*(.+?)_to_(.+?)\s*")
"""fsl_reg's output name (`sub05_FA_to_sub01_FA`), as its log files and outputs carry it."""


# -- reading ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CommandLog:
    """Where one attempt of one command left its stdout and stderr (`tbss_queue.logs`)."""

    batch: str
    task_id: str
    line: int
    command: str
    label: str
    state: str
    attempt: int
    """The attempt shown (1 = the first time a worker took the command)."""
    attempts: int
    """Attempts started so far."""
    stdout: str
    stderr: str
    node: str | None = None
    """The node of the shown attempt, when known."""
    missing: str | None = None
    """Why the files are not there (None when they are)."""
    stdout_tail: str = ""
    stderr_tail: str = ""
    """The record's tails (last attempt only): what there is when the files are missing."""
    outcome: str | None = None
    """How the shown attempt itself ended ("failed (exit code 1)", "succeeded", "running");
    None when no record tells (a worker lost mid-command leaves no end)."""

    def header(self, stream: str = "out") -> str:
        """The line above the output: which command, which attempt, how *that attempt* ended
        (not the command's state now), then what became of the command, and the file."""
        on = f" on {self.node}" if self.node else ""
        how = self.outcome or (
            "how it ended is not recorded (a failure retried by --retries, or its worker "
            "was lost or stopped)"
        )
        text = (
            f"batch {self.batch}, line {self.line} ({self.label}), "
            f"attempt {self.attempt} of {self.attempts}{on}: {how}"
        )
        if self.attempt == self.attempts and self.state == "queued" and self.outcome:
            text += "; queued again"
        if self.attempt < self.attempts:
            text += (
                f"; attempt {self.attempts} is running now"
                if self.state == "running"
                else f"; then {self.state} at attempt {self.attempts}"
            )
        return f"{text}: {self.path(stream)}"

    def path(self, stream: str = "out") -> str:
        return self.stderr if stream == "err" else self.stdout

    def read(self, stream: str = "out") -> bytes:
        """The whole file (for a notebook; the CLI streams it)."""
        with open(self.path(stream), "rb") as f:
            return f.read()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_ref(ref: str | int) -> int | tuple[str, str]:
    """A line number, or an fsl_reg pair given as `sub05→sub01`, `sub05->sub01`,
    `sub05,sub01` or by fsl_reg's output name `sub05_FA_to_sub01_FA` (moving, reference)."""
    if isinstance(ref, int) or str(ref).strip().isdecimal():
        return int(ref)
    m = _PAIR.fullmatch(str(ref)) or _OUTPUT.fullmatch(str(ref))
    if not m:
        raise ConfigError(
            f"{ref!r}: expected a line number or an fsl_reg pair "
            "(MOVING→REF, MOVING,REF or MOVING_to_REF)"
        )
    return m.group(1), m.group(2)


def _names(path: str) -> set[str]:
    """What a subject may be called: its image's base name, or that less a trailing `_FA`."""
    base = os.path.basename(path)
    return {base, short(base)}


def find_commands(
    specs: Iterable[tuple[str, dict[str, Any]]], ref: int | tuple[str, str]
) -> list[tuple[str, dict[str, Any]]]:
    """The commands (task id, spec) that a line number or a pair names."""
    found = []
    for task_id, spec in specs:
        if isinstance(ref, int):
            if spec.get("line") == ref:
                found.append((task_id, spec))
            continue
        reg = parse_fsl_reg(spec.get("argv", ()))
        if reg and ref[0] in _names(reg.input) and ref[1] in _names(reg.reference):
            found.append((task_id, spec))
    return found


def fsl_sub_paths(
    meta: dict[str, Any], batch_id: str, task_id: str, line: int, argv: Sequence[str], cwd: str
) -> tuple[str, str] | None:
    """Where fsl_sub's `-l` (or the plugin) had the worker write a task's logs, if it did."""
    kwargs = with_line(task_kwargs(meta), line)
    if not kwargs.get("log_dir"):
        return None
    fields = TaskFields(
        batch_id,
        task_id,
        tuple(argv),
        cwd,
        log_dir=kwargs["log_dir"],
        job_name=kwargs.get("job_name"),
        line=kwargs.get("line"),
        job_id=kwargs.get("job_id"),
        job_tasks=kwargs.get("job_tasks"),
    )
    return log_paths(fields)


def latest_batch_in(store: BatchStore, where: str | os.PathLike[str]) -> str:
    """The latest batch of the study at `where` (its directory, FA/, or the study's root
    above it, or a folder below it); the latest batch of all when none ran there."""
    here = Path(where).resolve()
    for bid in reversed(store.batch_ids()):
        meta = store.meta(bid)
        for ran_in in {meta.get("cwd"), meta.get("submit_cwd")} - {None, ""}:
            d = Path(str(ran_in))
            if here in (d, d.parent) or d in here.parents:
                return bid
    return store.resolve_id(None)


def recorded_ends(store: BatchStore, batch_id: str, line: int) -> list[tuple[str, str]]:
    """(state, node) of every recorded end of the command at `line`, oldest first: its
    entries in the batch's run log, read a chunk at a time."""
    key, prefix, found = batch_key(batch_id, "runs"), f"{line}\t", []
    for start in range(0, store.r.llen(key), 5 * CHUNK):
        for entry in store.r.lrange(key, start, start + 5 * CHUNK - 1):
            if str(entry).startswith(prefix):
                fields = str(entry).split("\t")
                found.append((fields[-1], fields[1]))
    return found


def attempt_outcome(
    n: int, attempts: int, state: str, last: dict[str, Any], ends: Sequence[tuple[str, str]]
) -> tuple[str | None, str | None]:
    """How attempt `n` ended and on which node. `last`: the record when it is attempt n's;
    `ends`: the command's run-log entries. The run log tells attempt n when every attempt
    but a running one left an entry; a lost worker leaves none, and then only the last,
    recorded attempt can be told."""
    if n == attempts and state == "running" and not last:
        return "running", None
    unrecorded = 1 if state == "running" and not last else 0
    ended: str | None = None
    node: str | None = None
    if len(ends) + unrecorded == attempts and n <= len(ends):
        ended, node = ends[n - 1]
    elif last and n == attempts:
        # a recorded attempt of a command queued again failed (`--retries`, `retry`)
        ended, node = ("failed" if state == "queued" else state), last.get("node")
    if ended is None:
        return None, None
    if last and ended not in ("succeeded", "skipped"):  # why, in the words every view uses
        why = describe(
            last.get("cause"),
            last.get("exit_code"),
            str(last.get("message") or ""),
            str(last.get("stderr_tail") or ""),
        )
        ended = f"{ended}: {why}"
    return ended, node


def copy_to(path: str, out: IO[bytes], chunk: int = 1 << 16) -> None:
    """Copy a file to `out` a chunk at a time (a log may be larger than memory)."""
    with open(path, "rb") as f:
        while data := f.read(chunk):
            out.write(data)


# -- GNU parallel's --joblog ---------------------------------------------------------------------

JOBLOG_HEADER = (
    "Seq",
    "Host",
    "Starttime",
    "JobRuntime",
    "Send",
    "Receive",
    "Exitval",
    "Signal",
    "Command",
)


def joblog_row(r: TaskRecord) -> str | None:
    """One joblog line for a command's last attempt, as GNU parallel writes it (Seq: the line
    of the commands file; Host: the node). A failure without an exit code (time limit, signal,
    fsl_reg's missing outputs, lost) has Exitval -1, as GNU parallel gives a timed-out job, so
    that every failure has a non-zero Exitval; None for a command that never started."""
    if r.started is None or r.ended is None:
        return None
    code = r.exit_code
    signal = -code if code is not None and code < 0 else 0
    exitval = code if code is not None and code >= 0 else 0
    if r.state == "failed" and exitval == 0:
        exitval = -1
    command = " ".join(r.text.split())  # one line, no tab: the last column is the command
    fields = (
        str(r.line),
        r.node or ":",
        f"{r.started:.3f}",
        f"{r.ended - r.started:10.3f}",
        "0",
        "0",
        str(exitval),
        str(signal),
        command,
    )
    return "\t".join(fields)


def joblog_lines(records: Iterable[TaskRecord]) -> Iterator[str]:
    """The joblog: its header, then one line per command that ran, in order of start."""
    yield "\t".join(JOBLOG_HEADER)
    rows = [(r.started or 0.0, r.line, joblog_row(r)) for r in records]
    for _, _, row in sorted(rows, key=lambda x: (x[0], x[1])):
        if row is not None:
            yield row


def write_joblog(records: Iterable[TaskRecord], path: str | os.PathLike[str]) -> int:
    """Write the joblog to `path` (replaced whole); returns the number of commands in it."""
    n = -1
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for n, text in enumerate(joblog_lines(records)):  # noqa: B007
                f.write(text + "\n")
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return n
