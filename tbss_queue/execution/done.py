"""When is a command's work already done? fsl_reg's outputs, or a `--done-if-exists` pattern.

Checked at submit time (such commands count as skipped) and again by the worker right before a
command starts, so a registration finished by someone else meanwhile is not run again.
"""

from __future__ import annotations

import glob
import os
import stat
import string
from collections.abc import Sequence
from dataclasses import dataclass

from tbss_queue.errors import ConfigError
from tbss_queue.fsl.outputs import parse_fsl_reg, reg_done, reg_done_at
from tbss_queue.fsl.outputs import remove_stale as remove_stale_reg
from tbss_queue.opening import UnsafeFile


@dataclass(frozen=True)
class DoneMarker:
    """The evidence that a command's work exists: fsl_reg outputs or files matching a pattern."""

    cwd: str
    argv: tuple[str, ...]
    pattern: str | None
    dir_fd: int | None = None
    """The worker's opened cwd: everything is then looked up relative to it, and a score file
    that is not a regular file raises opening.UnsafeFile instead of counting as not done."""

    def done(self) -> bool:
        if self.pattern is None:
            reg = parse_fsl_reg(self.argv)
            if reg is not None and self.dir_fd is not None:
                return reg_done_at(reg, self.dir_fd)
            return reg is not None and reg_done(reg, self.cwd)
        if self.dir_fd is not None:
            found = glob.glob(self.pattern, dir_fd=self.dir_fd)
            return any(_non_empty(m, self.dir_fd) for m in found)
        matches = glob.glob(os.path.join(self.cwd, self.pattern))
        return any(os.path.isfile(m) and os.path.getsize(m) > 0 for m in matches)

    def describe(self) -> str:
        if self.pattern is None:
            reg = parse_fsl_reg(self.argv)
            return f"{reg.output}_warp.msf (two numbers) and its warp image" if reg else "?"
        return f"a non-empty file matching {self.pattern}"


def judge_done(marker: DoneMarker | None) -> tuple[bool, str | None]:
    """(done, None), or (False, why it can't be judged): a marker that is not a regular file
    (a FIFO, a device, a symlink), named by its path, fails the command rather than hang it."""
    if marker is None:
        return False, None
    try:
        return marker.done(), None
    except UnsafeFile as exc:
        return False, f"{os.path.join(marker.cwd, exc.path)} is {exc.what}"


def _non_empty(name: str, dir_fd: int) -> bool:
    """A non-empty regular file (stat only: a match is never opened, so a FIFO can't block)."""
    try:
        info = os.stat(name, dir_fd=dir_fd)
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and info.st_size > 0


def placeholders(argv: Sequence[str]) -> dict[str, str]:
    """{out} {in} {ref} of an fsl_reg line (else {out} = the last argument), {0}..{N} = argv."""
    reg = parse_fsl_reg(argv)
    values = {str(i): word for i, word in enumerate(argv)}
    values["last"] = argv[-1]
    values["out"] = reg.output if reg else argv[-1]
    if reg:
        values["in"], values["ref"] = reg.input, reg.reference
    return values


def expand(pattern: str, argv: Sequence[str]) -> str:
    """Fill a --done-if-exists pattern for one command; ConfigError names a bad placeholder."""
    values = placeholders(argv)
    for _, field, _, _ in string.Formatter().parse(pattern):
        if field is not None and field not in values:
            raise ConfigError(
                f"--done-if-exists {pattern!r}: unknown placeholder {{{field}}} for "
                f"{' '.join(argv)!r} (use {{out}}, {{in}}, {{ref}}, {{last}} or {{0}}..)"
            )
    return pattern.format_map(values)


def done_marker(
    argv: Sequence[str], cwd: str, pattern: str | None, dir_fd: int | None = None
) -> DoneMarker | None:
    """How to tell this command is done, or None when nothing tells (it always runs)."""
    if pattern:
        return DoneMarker(cwd, tuple(argv), expand(pattern, argv), dir_fd)
    if parse_fsl_reg(argv) is not None:
        return DoneMarker(cwd, tuple(argv), None, dir_fd)
    return None


def remove_stale(
    argv: Sequence[str], cwd: str, roots: Sequence[str] = (), dir_fd: int | None = None
) -> list[str]:
    """Before a (re)run, delete an earlier attempt's outputs (fsl_reg lines only), never
    outside `roots` when given, and only inside the opened `dir_fd` when given."""
    reg = parse_fsl_reg(argv)
    return remove_stale_reg(reg, cwd, roots, dir_fd) if reg is not None else []
