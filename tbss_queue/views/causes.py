"""Why a command failed, in words: one vocabulary for the terminal, `failures`, `logs` and
the report (Flower shows the same record's message as the task's exception).

A record keeps a cause *code* (`exit`, `missing output`, `refused`, ...) for scripts and a
*message* in words that names the exit or the file (`exit code 0 but sub05_FA_to_sub01_FA_warp.msf
(two numbers) and its warp image is missing or empty`), to which the worker appends the last
line of stderr. Every view says the message, the stderr line apart, whole: a long one wraps,
it is never cut; the code alone (`missing output 0`) reads as if 0 were the count.
"""

from __future__ import annotations

import os
import signal

from tbss_queue.fsl.outputs import parse_fsl_reg
from tbss_queue.models import TaskRecord

_WORDS = {
    "exit": "exit code {code}",
    "missing output": "exit code {code} but its outputs are missing or empty",
    "signal": "killed by signal {signal}",
    "timeout": "time limit reached; process group killed",
    "not-found": "executable not found",
    "no-cwd": "working directory does not exist",
    "too-long": "command line longer than the system allows",
    "stopped": "stopped from outside; process tree killed",
    "refused": "refused by the worker's policy",
    "lost": "its worker was lost",
    "worker error": "the worker failed to handle it",
}
"""Words for a record that has no message of its own (recorded before messages were kept)."""


def last_line(stderr_tail: str) -> str:
    """The last non-empty line of a stderr tail, whole ('' if none)."""
    lines = [ln for ln in stderr_tail.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


def describe(cause: str | None, exit_code: int | None, message: str, stderr_tail: str = "") -> str:
    """Why a command failed, in words naming the exit or the file: its message without the
    stderr line the worker appended to it (shown apart, see `last_line`); for a record with
    no message, words made from its cause and exit code."""
    message = message.strip()
    tail = last_line(stderr_tail)[:300]  # the worker appends `: <line>`, cut at 300 chars
    if tail and message.endswith(tail):
        message = message[: -len(tail)].rstrip().removesuffix(":").rstrip()
    if message:
        return message
    name = ""
    if exit_code is not None and exit_code < 0:
        sig = -exit_code
        name = signal.Signals(sig).name if sig in signal.valid_signals() else str(sig)
    words = _WORDS.get(cause or "", cause or "failed")
    return words.format(code="?" if exit_code is None else exit_code, signal=name or "?")


def in_words(record: TaskRecord) -> str:
    """`describe` of a failed command's record."""
    return describe(record.cause, record.exit_code, record.message, record.stderr_tail)


def heading(record: TaskRecord) -> str:
    """`line 12 (sub05_FA→sub01_FA) on w1@vm: <why, in words>`: a failed command's first line
    in the terminal (`failures`, the end of `submit --wait` and `run`)."""
    reg = parse_fsl_reg(record.argv)
    pair = f" ({os.path.basename(reg.input)}→{os.path.basename(reg.reference)})" if reg else ""
    return f"line {record.line}{pair} on {record.node or '-'}: {in_words(record)}"
