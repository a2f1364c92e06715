"""Open what the worker checked, and use only that: directories by descriptor, no symlinks.

A path checked and then used by its name can change in between (a directory renamed and a
symlink put in its place). So the worker opens a command's working directory once, from its
`--root` anchor, without following any symlink (`openat2` with RESOLVE_BENEATH |
RESOLVE_NO_SYMLINKS where the kernel has it, else a component walk with O_NOFOLLOW), and from
then on reads, removes and starts everything relative to that descriptor. Files the worker
reads (score files, markers) must be regular: a FIFO planted in their place would block the
read for ever, so they are opened O_NONBLOCK and refused by fstat.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from tbss_queue.paths import under

READ_CAP = 64 * 1024
"""Bytes read at most from a marker or score file (an .msf holds two numbers)."""

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_NOFOLLOW_DIR = _DIR | os.O_NOFOLLOW
_READ = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
_SYS_OPENAT2 = 437  # the same number on every Linux architecture
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08


class UnsafeFile(OSError):
    """Raised when a file the worker must read is not a regular file (a FIFO, a device, a
    directory, a symlink): reading it could block or escape, so the command fails instead."""

    def __init__(self, path: str, what: str) -> None:
        super().__init__(errno.EINVAL, f"{path} is {what}")
        self.path, self.what = path, what

    def __str__(self) -> str:
        return str(self.strerror)


def kind(mode: int) -> str:
    """What a file is, for a one-line message ('a FIFO', 'a directory', ...)."""
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISLNK, "a symlink"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISREG, "a regular file"),
    ):
        if test(mode):
            return name
    return "a special file"


class _OpenHow(ctypes.Structure):
    _fields_ = [  # noqa: RUF012 (ctypes' own protocol)
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


def _load_syscall() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    try:
        return ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):  # pragma: no cover
        return None


_SYSCALL = _load_syscall()
_HAS_OPENAT2: bool | None = None  # learnt on first use: ENOSYS on kernels before 5.6


def _openat2(dir_fd: int, rel: str, flags: int) -> int | None:
    """openat2(dir_fd, rel, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS), or None without it."""
    global _HAS_OPENAT2
    if _SYSCALL is None or _HAS_OPENAT2 is False:
        return None
    how = _OpenHow(flags, 0, _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS)
    while True:
        fd = int(
            _SYSCALL(
                ctypes.c_long(_SYS_OPENAT2),
                ctypes.c_int(dir_fd),
                ctypes.c_char_p(os.fsencode(rel)),
                ctypes.byref(how),
                ctypes.c_size_t(ctypes.sizeof(how)),
            )
        )
        if fd >= 0:
            _HAS_OPENAT2 = True
            return fd
        err = ctypes.get_errno()
        if err == errno.EINTR:
            continue
        if err in (errno.ENOSYS, errno.EPERM) and not _HAS_OPENAT2:
            # no openat2 here (old kernel, or a seccomp filter that denies it): walk instead
            _HAS_OPENAT2 = False
            return None
        raise OSError(err, os.strerror(err), rel)


def _walk(dir_fd: int, parts: Sequence[str], flags: int) -> int:
    """The same without openat2: one component at a time, none of them a symlink."""
    fd = os.dup(dir_fd)
    try:
        for i, part in enumerate(parts):
            if part in ("", ".", ".."):
                raise OSError(errno.EXDEV, "'..' or an empty component", part)
            last = i == len(parts) - 1
            nxt = os.open(part, (flags | os.O_NOFOLLOW) if last else _NOFOLLOW_DIR, dir_fd=fd)
            fd, old = nxt, fd
            os.close(old)
        if not parts:
            nxt = os.open(".", flags, dir_fd=fd)
            fd, old = nxt, fd
            os.close(old)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_beneath(dir_fd: int, rel: str, flags: int = _DIR) -> int:
    """Open `rel` (relative, no '..') below the directory `dir_fd`, following no symlink on the
    way, the last component included. OSError (ELOOP, ENOTDIR, EXDEV...) when one is there."""
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if ".." in parts or rel.startswith("/"):
        raise OSError(errno.EXDEV, "outside the directory", rel)
    if parts:
        fd = _openat2(dir_fd, "/".join(parts), flags | os.O_NOFOLLOW)
        if fd is not None:
            return fd
    return _walk(dir_fd, parts, flags)


@dataclass(frozen=True)
class WorkDir:
    """A command's working directory, opened once: `fd` is what the worker uses from then on;
    `path` is the real path it was opened by (for messages and for the policy)."""

    path: str
    fd: int


@contextlib.contextmanager
def opened_workdir(cwd: str, roots: Sequence[str] = ()) -> Iterator[WorkDir]:
    """Open `cwd` below the `--root` that holds its real path (else below `/`), with no symlink
    followed below that anchor. FileNotFoundError when it is not there; OSError: EXDEV when
    its real path lies outside every root, ELOOP or ENOTDIR when a symlink or a file took a
    component's place between the realpath and the open.
    """
    real = os.path.realpath(cwd)
    if roots:
        anchors = [r for r in roots if under(real, r)]
        if not anchors:
            raise OSError(errno.EXDEV, "outside this worker's --root", cwd)
        anchor = max(anchors, key=len)
    else:
        anchor = "/"
    base = os.open(anchor, _DIR)
    try:
        fd = open_beneath(base, real[len(anchor) :].lstrip("/"), _DIR)
    finally:
        os.close(base)
    try:
        yield WorkDir(real, fd)
    finally:
        os.close(fd)


def read_regular(dir_fd: int, rel: str, cap: int = READ_CAP, shown: str | None = None) -> bytes:
    """The first `cap` bytes of the regular file `rel` below `dir_fd`, never blocking and never
    following a symlink. FileNotFoundError when it is missing; UnsafeFile (naming `shown`, else
    `rel`) when it is anything but a regular file."""
    name = shown or rel
    try:
        fd = open_beneath(dir_fd, rel, _READ)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFile(name, "a symlink (or behind one), not a regular file") from None
        if exc.errno == errno.EXDEV:
            raise UnsafeFile(name, "outside the working directory") from None
        if exc.errno == errno.ENXIO:  # a socket
            raise UnsafeFile(name, "a socket, not a regular file") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeFile(name, f"{kind(info.st_mode)}, not a regular file")
        return os.read(fd, cap)
    finally:
        os.close(fd)


def read_regular_path(path: str, cap: int = READ_CAP) -> bytes:
    """read_regular for a path the reader trusts up to its last component (submit's own study
    directory): only the file itself must be regular."""
    head, tail = os.path.split(path)
    base = os.open(head or ".", _DIR)
    try:
        return read_regular(base, tail, cap, shown=path)
    finally:
        os.close(base)


def unlink_beneath(dir_fd: int, rel: str) -> bool:
    """Remove `rel` below `dir_fd` (its folder opened with no symlink followed; the file itself,
    if a symlink, is removed, not followed). False when it was not there."""
    head, _, tail = rel.rpartition("/")
    parent = open_beneath(dir_fd, head, _DIR) if head else os.dup(dir_fd)
    try:
        os.unlink(tail, dir_fd=parent)
    except FileNotFoundError:
        return False
    finally:
        os.close(parent)
    return True
