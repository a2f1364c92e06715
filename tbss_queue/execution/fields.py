"""The worker's trust boundary for the fields of a task message.

Whoever holds the Redis password can rewrite a queued message, so the worker trusts none of its
fields: `check_fields` checks every one against the worker's own policy before anything touches
the filesystem, and `open_logs` opens fsl_sub-style log files without following a symlink
anywhere below a trusted anchor directory (a `--root`, else the command's cwd).
"""

from __future__ import annotations

import contextlib
import os
import re
import reprlib
import stat
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from tbss_queue.commands import ExecLimits
from tbss_queue.paths import under

OPTIONS = (
    "time_limit",
    "retries",
    "done_if_exists",
    "log_dir",
    "job_name",
    "line",
    "job_id",
    "job_tasks",
    "mem",
    "threads",
)
MAX_MEM = 2**50
MAX_THREADS = 4096
MAX_ARGS = 100_000
MAX_TIME_LIMIT = 30 * 86400
MAX_RETRIES = 100
MAX_LINE = 10_000_000
MAX_JOB_ID = 2**53
NAME_MAX = 255
DEFAULT_JOB_NAME = "tbss-queue"
_SHOWN = 200
_BATCH_ID = re.compile(r"[0-9a-f]{8}")
_COMMAND_ID = re.compile(r"[0-9a-f]{16}")  # publish.task_id_for
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_FILE = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK


class RefusedField(Exception):
    """A message field the worker will not act on: the message is forged or corrupt."""

    def __init__(self, field: str, reason: str) -> None:
        self.field, self.reason = field, reason
        super().__init__(f"field {_shown(field)}: {reason}")

    def __reduce__(self) -> tuple[type[RefusedField], tuple[str, str]]:
        return RefusedField, (self.field, self.reason)  # Celery pickles exceptions


@dataclass(frozen=True)
class TaskFields:
    """A task message's fields, every one checked by `check_fields`."""

    batch_id: str
    command_id: str
    argv: tuple[str, ...]
    cwd: str
    time_limit: float | None = None
    retries: int = 0
    done_if_exists: str | None = None
    log_dir: str | None = None
    job_name: str | None = None
    line: int | None = None
    job_id: int | None = None
    """The fsl_sub job id (fsl_sub_plugin_tbss_queue): logs and FSLSUB_* variables use it."""
    job_tasks: int | None = None
    """An fsl_sub array job's number of tasks; None for a single job."""
    mem: int | None = None
    """Bytes of memory the command asks of a node (resources.py); None: not declared."""
    threads: int | None = None
    """Threads it runs, each a slot of its node; None: one, and no thread variables set."""


def _shown(value: object) -> str:
    """A forged value escaped onto one line and cut to ~200 characters: logs stay readable."""
    text = repr(value[: _SHOWN + 1]) if isinstance(value, str) else reprlib.repr(value)
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "…"


def _refused(field: str, reason: str, value: object) -> RefusedField:
    return RefusedField(field, f"{reason} (got {_shown(value)})")


def _text(field: str, value: object, what: str = "") -> str:
    """A str that the OS can take: no NUL, and valid UTF-8 (no lone surrogates)."""
    if not isinstance(value, str):
        raise _refused(field, f"{what}must be a string", value)
    if "\0" in value:
        raise _refused(field, f"{what}NUL is not allowed", value)
    try:
        value.encode()
    except UnicodeEncodeError:
        raise _refused(field, f"{what}must be valid UTF-8 (no lone surrogates)", value) from None
    return value


def _path(field: str, value: object, absolute: bool | None, normal: bool = True) -> str:
    """A path with no '..' component, so it cannot climb out of where it is anchored."""
    path = _text(field, value)
    if not path:
        raise _refused(field, "must not be empty", value)
    if absolute is not None and os.path.isabs(path) != absolute:
        raise _refused(field, "must be " + ("absolute" if absolute else "relative"), value)
    if ".." in path.split("/"):
        raise _refused(field, "'..' is not allowed", value)
    if normal and ("//" in path or os.path.normpath(path) != path):
        raise _refused(field, "must be a normalized path", value)
    return path


def _file_name(field: str, value: object) -> str:
    """One path component: no '/', not '.' or '..', no control characters, <= NAME_MAX bytes."""
    name = _text(field, value)
    if not name or "/" in name or name in (".", ".."):
        raise _refused(field, "must be a single file name", value)
    if any(unicodedata.category(c) == "Cc" for c in name):
        raise _refused(field, "control characters are not allowed", value)
    if len(name.encode()) > NAME_MAX:
        raise _refused(field, f"longer than {NAME_MAX} bytes", value)
    return name


def _int(field: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _refused(field, "must be an integer", value)
    if not low <= value <= high:
        raise _refused(field, f"must be in {low}..{high}", value)
    return value


def _argv(value: object) -> tuple[str, ...]:
    """1..100,000 strings that exec can take whole: no NUL, valid, within ARG_MAX."""
    if not isinstance(value, (list, tuple)):
        raise _refused("argv", "must be a list of strings", value)
    if not 1 <= len(value) <= MAX_ARGS:
        raise RefusedField("argv", f"must have 1..{MAX_ARGS} items (got {len(value)})")
    items = tuple(_text("argv", item, f"item {i}: ") for i, item in enumerate(value))
    limits = ExecLimits.of_this_system()  # the same judge as submit's (commands.py)
    for i, item in enumerate(items):
        n = len(item.encode()) + 1
        if n > limits.word:
            raise RefusedField("argv", f"item {i}: {n} bytes, over MAX_ARG_STRLEN={limits.word}")
    size = limits.size(items)
    if size > limits.argv:
        raise RefusedField(
            "argv", f"{size} bytes, over ARG_MAX less room for the environment ({limits.argv})"
        )
    if not value[0]:
        raise RefusedField("argv", "argv[0] must not be empty")
    return items


def check_fields(
    batch_id: object,
    command_id: object,
    argv: object,
    cwd: object,
    options: Mapping[str, object],
    *,
    roots: Sequence[str] = (),
) -> TaskFields:
    """The message's fields once every one passed; RefusedField names the first that did not."""
    if not isinstance(batch_id, str) or not _BATCH_ID.fullmatch(batch_id):
        raise _refused("batch_id", "must be 8 lowercase hex digits", batch_id)
    if not isinstance(command_id, str) or not _COMMAND_ID.fullmatch(command_id):
        raise _refused("command_id", "must be 16 lowercase hex digits", command_id)
    args = _argv(argv)
    where = _path("cwd", cwd, absolute=True)
    if roots and not any(under(where, r) for r in roots):
        raise _refused("cwd", "is outside the worker's --root directories", where)
    for key in options:
        if key not in OPTIONS:
            raise RefusedField(str(key)[:_SHOWN], f"unknown option (known: {', '.join(OPTIONS)})")
    get = options.get
    limit = get("time_limit")
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, (int, float)):
            raise _refused("time_limit", "must be a number of seconds", limit)
        if not 0 < limit <= MAX_TIME_LIMIT:  # NaN and inf fail this too
            raise _refused("time_limit", f"must be in (0, {MAX_TIME_LIMIT}] seconds", limit)
    retries = 0 if get("retries") is None else _int("retries", get("retries"), 0, MAX_RETRIES)
    done = get("done_if_exists")
    done = None if done is None else _path("done_if_exists", done, absolute=False, normal=False)
    log_dir = None if get("log_dir") is None else _path("log_dir", get("log_dir"), absolute=None)
    if log_dir is not None and roots:
        folder = os.path.normpath(os.path.join(where, log_dir))
        if not any(under(folder, r) for r in (roots if os.path.isabs(log_dir) else [where])):
            raise _refused("log_dir", "is outside cwd and the --root directories", log_dir)
    name = None if get("job_name") is None else _file_name("job_name", get("job_name"))
    line = None if get("line") is None else _int("line", get("line"), 1, MAX_LINE)
    job_id = None if get("job_id") is None else _int("job_id", get("job_id"), 1, MAX_JOB_ID)
    tasks = None if get("job_tasks") is None else _int("job_tasks", get("job_tasks"), 1, MAX_LINE)
    seconds = None if limit is None else float(limit)
    got = TaskFields(
        batch_id,
        command_id,
        args,
        where,
        seconds,
        retries,
        done,
        log_dir,
        name,
        line,
        job_id,
        tasks,
        None if get("mem") is None else _int("mem", get("mem"), 1, MAX_MEM),
        None if get("threads") is None else _int("threads", get("threads"), 1, MAX_THREADS),
    )
    for log in log_names(got) or ():
        _file_name("job_name", log)  # the whole log name must fit NAME_MAX too
    return got


def log_names(fields: TaskFields) -> tuple[str, str] | None:
    """fsl_sub's log file names, <name>.o<id>[.<line>] and .e…; None without a log_dir. The id
    is the fsl_sub job id where there is one, else the batch id."""
    if fields.log_dir is None:
        return None
    name = fields.job_name or DEFAULT_JOB_NAME
    job = fields.batch_id if fields.job_id is None else str(fields.job_id)
    suffix = job if fields.line is None else f"{job}.{fields.line}"
    return f"{name}.o{suffix}", f"{name}.e{suffix}"


def log_paths(fields: TaskFields) -> tuple[str, str] | None:
    """The two log paths, in log_dir (relative to cwd unless absolute); None without one."""
    names = log_names(fields)
    if names is None or fields.log_dir is None:
        return None
    folder = os.path.normpath(os.path.join(fields.cwd, fields.log_dir))
    return os.path.join(folder, names[0]), os.path.join(folder, names[1])


def open_logs(
    cwd: str,
    log_dir: str,
    names: tuple[str, str],
    roots: Sequence[str] = (),
    cwd_fd: int | None = None,
) -> tuple[BinaryIO, BinaryIO]:
    """Open (create, truncate) the two log files for stdout and stderr, readable for the tail.

    The walk starts at an anchor (the --root holding the log dir; else cwd when the log dir
    is in it; else "/") and opens each component relative to the last with O_NOFOLLOW, so a
    symlink planted anywhere below the anchor is refused rather than followed. Missing log
    folders are created; cwd itself must exist. Other failures raise OSError. With `cwd_fd`
    (the worker's opened cwd) a log folder inside cwd is walked to from that descriptor: the
    logs land in the folder the command runs in, whatever its path names now.
    """
    where = _path("cwd", cwd, absolute=True)
    folder = os.path.normpath(os.path.join(where, _path("log_dir", log_dir, absolute=None)))
    files = [_file_name("job_name", name) for name in names]
    if roots:
        anchors = [os.path.normpath(r) for r in roots if under(folder, r)]
        if not anchors:
            raise _refused("log_dir", "is outside the --root directories", log_dir)
        anchor = max(anchors, key=len)
    else:
        anchor = where if under(folder, where) else "/"
    in_cwd = under(folder, where) and under(where, anchor)
    if cwd_fd is not None and under(folder, where):
        dir_fd = _walk_from(os.dup(cwd_fd), _parts(where, folder), 0)
    else:
        existing = len(_parts(anchor, where)) if in_cwd else 0
        dir_fd = _walk_from(os.open(anchor, _DIR), _parts(anchor, folder), existing)
    opened: list[BinaryIO] = []
    try:
        for name in files:
            opened.append(_open_file(name, dir_fd))
    except BaseException:
        for f in opened:
            f.close()
        raise
    finally:
        os.close(dir_fd)
    return opened[0], opened[1]


def _parts(anchor: str, path: str) -> list[str]:
    rest = path[len(anchor) :].strip("/")
    return rest.split("/") if rest else []


def _open_at(name: str, dir_fd: int, flags: int, field: str) -> int:
    """os.open relative to dir_fd, never following a symlink: one is a RefusedField."""
    try:
        return os.open(name, flags | os.O_NOFOLLOW, 0o644, dir_fd=dir_fd)
    except OSError:
        with contextlib.suppress(OSError):
            if stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                raise RefusedField(field, f"symlink {_shown(name)} is not followed") from None
        raise


def _walk_from(fd: int, parts: list[str], existing: int) -> int:
    """An fd of fd/parts... (fd is taken over), the first `existing` parts found, the others
    made if missing."""
    try:
        for i, part in enumerate(parts):
            try:
                nxt = _open_at(part, fd, _DIR, "log_dir")
            except FileNotFoundError:
                if i < existing:
                    raise
                with contextlib.suppress(FileExistsError):  # made meanwhile: opened below
                    os.mkdir(part, 0o755, dir_fd=fd)
                nxt = _open_at(part, fd, _DIR, "log_dir")
            fd, old = nxt, fd
            os.close(old)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_file(name: str, dir_fd: int) -> BinaryIO:
    """A regular file with no other hard link, truncated only once that is known."""
    fd = _open_at(name, dir_fd, _FILE, "job_name")
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
            raise RefusedField("job_name", f"{_shown(name)} is not a lone regular file")
        os.ftruncate(fd, 0)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "w+b")
    except BaseException:
        os.close(fd)
        raise
