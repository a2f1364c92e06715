"""A command's log files, written by the node that runs it: two files per attempt in the
batch's log directory, `<cwd>/.tbss-queue/logs/<batch>/`, named by line and attempt, with the
pair for fsl_reg (`12.1.out`, `7.2.sub05_FA_to_sub01_FA.err`). `views.logfiles` reads them.

The directory lies under the command's cwd, which the worker has already checked against its
`--root`s: the files are opened with `fields.open_logs` (no symlink followed below the anchor).
A node that cannot write them still runs the command; its record says why (`log_error`).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from typing import BinaryIO

from tbss_queue.execution.fields import RefusedField, open_logs
from tbss_queue.fsl.outputs import parse_fsl_reg

log = logging.getLogger(__name__)

LOG_DIR = os.path.join(".tbss-queue", "logs")
"""Where a batch's logs go, relative to its working directory (then one folder per batch)."""

STREAMS = ("out", "err")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")
_NAME_PART = 80  # bytes of each subject name kept in a file name (NAME_MAX is 255)


def batch_log_dir(batch_id: str) -> str:
    """The batch's log directory relative to its working directory."""
    return os.path.join(LOG_DIR, batch_id)


def _safe(name: str) -> str:
    return _UNSAFE.sub("_", os.path.basename(name))[:_NAME_PART] or "_"


def log_stem(line: int, attempt: int, argv: Sequence[str]) -> str:
    """`<line>.<attempt>`, then `.<in>_to_<ref>` for an fsl_reg pair: the log files' name
    without `.out`/`.err`, which a person finds with ls by line, attempt or subject."""
    stem = f"{line}.{attempt}"
    reg = parse_fsl_reg(argv)
    if reg is not None:
        stem += f".{_safe(reg.input)}_to_{_safe(reg.reference)}"
    return stem


def open_attempt_logs(
    cwd: str, batch_id: str, stem: str, roots: Sequence[str] = (), cwd_fd: int | None = None
) -> tuple[tuple[BinaryIO, BinaryIO] | None, str | None]:
    """The two log files of one attempt, opened for writing, or (None, why not): a node that
    cannot write them (read-only mount, another user's folder, a planted symlink) still runs
    the command, so that logging never costs a result."""
    try:
        names = (f"{stem}.out", f"{stem}.err")
        files = open_logs(cwd, batch_log_dir(batch_id), names, roots, cwd_fd)
    except (RefusedField, OSError) as exc:
        where = os.path.join(cwd, batch_log_dir(batch_id))
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        log.warning("batch %s: no log files for %s in %s: %s", batch_id, stem, where, reason)
        return None, f"log files not written in {where}: {reason}"
    return files, None
