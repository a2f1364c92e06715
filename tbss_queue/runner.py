"""Run one command as a subprocess: own session, no shell, output tails, whole tree killed.

Deliberately free of Celery and Redis so it can be tested in milliseconds. Celery never kills a
task's child processes, so this module does: the command leads its own session and that whole
process group is killed in a `finally`, which also runs when the pool process gets SIGTERM
(time limit, revoke, shutdown) because billiard turns SIGTERM into SystemExit.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import IO, Any

TAIL_BYTES = 64 * 1024
"""How much of the end of stdout and of stderr is kept."""

KILL_GRACE = 2.0
"""Seconds between SIGTERM and SIGKILL when a command's process group is stopped."""

# causes of failure, also used as task states by the bookkeeping
CAUSE_EXIT = "exit"
CAUSE_SIGNAL = "signal"
CAUSE_TIMEOUT = "timeout"
CAUSE_NOT_FOUND = "not-found"
CAUSE_NO_CWD = "no-cwd"


@dataclass(frozen=True)
class RunResult:
    """What happened to one command."""

    exit_code: int | None
    started: float
    ended: float
    stdout_tail: str
    stderr_tail: str
    cause: str | None = None  # None on success
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.cause is None

    @property
    def duration(self) -> float:
        return self.ended - self.started

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "duration": self.duration}


def run_command(
    argv: Sequence[str],
    cwd: str,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    on_tick: Callable[[int], None] | None = None,
    tick: float = 5.0,
    tail_bytes: int = TAIL_BYTES,
    log_files: tuple[str, str] | None = None,
) -> RunResult:
    """Run argv in cwd; never raises for the command's own failures (they are in the result).

    Output goes to `log_files` (stdout, stderr) when given (fsl_sub's -l), else to temporary
    files; either way only the last `tail_bytes` are returned.

    on_tick(pid) is called about every `tick` seconds while the command runs (heartbeats).
    """
    started = time.time()
    if not os.path.isdir(cwd):
        return _failed(started, CAUSE_NO_CWD, f"working directory does not exist: {cwd}")
    with _output(log_files, 0) as out, _output(log_files, 1) as err:
        try:
            proc = _spawn(argv, cwd, env, out, err)
        except FileNotFoundError:
            return _failed(started, CAUSE_NOT_FOUND, f"executable not found: {argv[0]}")
        except PermissionError:
            return _failed(
                started, CAUSE_NOT_FOUND, f"executable not runnable (permission denied): {argv[0]}"
            )
        except OSError as exc:
            return _failed(
                started, CAUSE_NOT_FOUND, f"cannot start {argv[0]}: {exc.strerror or exc}"
            )
        timed_out = False
        try:
            deadline = None if timeout is None else started + timeout
            with _exit_watch(proc) as exited:
                while True:
                    wait = tick if deadline is None else max(0.0, min(tick, deadline - time.time()))
                    if exited(wait):
                        break
                    if deadline is not None and time.time() >= deadline:
                        timed_out = True
                        break
                    if on_tick is not None:
                        on_tick(proc.pid)
        finally:
            kill_process_group(proc.pid)
            with contextlib.suppress(Exception):
                proc.wait(timeout=KILL_GRACE)
        ended = time.time()
        stdout, stderr = _tail(out, tail_bytes), _tail(err, tail_bytes)
    code = proc.returncode

    def outcome(cause: str | None = None, message: str = "") -> RunResult:
        return RunResult(code, started, ended, stdout, stderr, cause, message)

    if timed_out:
        return outcome(CAUSE_TIMEOUT, f"time limit of {timeout:g} s reached; process group killed")
    if code is not None and code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        return outcome(CAUSE_SIGNAL, f"killed by signal {name}" + last_line(stderr))
    if code != 0:
        return outcome(CAUSE_EXIT, f"exit code {code}" + last_line(stderr))
    return outcome()


def _spawn(
    argv: Sequence[str],
    cwd: str,
    env: Mapping[str, str] | None,
    out: IO[bytes],
    err: IO[bytes],
) -> subprocess.Popen[bytes]:
    """Start the command in its own session, to be SIGKILLed if this process dies.

    With util-linux's setpriv the death signal is set by an exec wrapper: a preexec_fn would
    force a full fork of the (large) pool process, 5 ms per command instead of 1.
    """
    wrapper: list[str] = []
    preexec = None
    if _SETPRIV is not None:
        _check_executable(argv[0], cwd, env)  # setpriv would report it only as exit 127
        wrapper = [_SETPRIV, "--pdeathsig", "KILL", "--"]
    elif _PRCTL is not None:
        preexec = _die_with_parent
    return subprocess.Popen(
        [*wrapper, *argv],
        cwd=cwd,
        env=dict(env) if env is not None else None,
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=err,
        start_new_session=True,
        preexec_fn=preexec,  # noqa: PLW1509
    )


def _check_executable(name: str, cwd: str, env: Mapping[str, str] | None) -> None:
    """Raise what Popen would for an executable that is missing or not runnable."""
    if os.sep in name:
        path = os.path.join(cwd, name)
    else:
        search = (env if env is not None else os.environ).get("PATH", os.defpath)
        path = shutil.which(name, mode=os.F_OK, path=search) or ""
    if not path or not os.path.exists(path):
        raise FileNotFoundError(name)
    if not os.access(path, os.X_OK) or os.path.isdir(path):
        raise PermissionError(name)


@contextlib.contextmanager
def _exit_watch(proc: subprocess.Popen[bytes]) -> Iterator[Callable[[float], bool]]:
    """exited(timeout): wait up to timeout seconds for the command to end, waking the moment
    it does (a pidfd on Linux; Popen.wait polls with growing sleeps otherwise)."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        fd = None

    def exited(timeout: float) -> bool:
        if fd is not None:
            select.select([fd], [], [], timeout)
            return proc.poll() is not None
        try:
            proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    try:
        yield exited
    finally:
        if fd is not None:
            os.close(fd)


def _load_prctl() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # pragma: no cover
        return None


_PRCTL = _load_prctl()
_SETPRIV = shutil.which("setpriv") if _PRCTL is not None else None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child: SIGKILL me when my parent dies (a worker killed with SIGKILL, OOM).

    The `finally` of run_command can't run then, and an orphaned command finishing after its
    task was requeued elsewhere would run twice. Covers the direct child only; grandchildren
    are covered by systemd's control-group kill in deployments (see worker/).
    """
    _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)


def kill_process_group(pgid: int, grace: float = KILL_GRACE) -> None:
    """SIGTERM the group, give it `grace` seconds, then SIGKILL what is left."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        # our own child may be a zombie that keeps the group alive: reap it
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pgid, os.WNOHANG)
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _output(log_files: tuple[str, str] | None, which: int) -> IO[bytes]:
    if log_files is None:
        return tempfile.TemporaryFile()
    os.makedirs(os.path.dirname(log_files[which]) or ".", exist_ok=True)
    return open(log_files[which], "w+b")  # noqa: SIM115 - closed by the caller's `with`


def _failed(started: float, cause: str, message: str) -> RunResult:
    return RunResult(None, started, time.time(), "", message, cause, message)


def _tail(f: IO[bytes], limit: int) -> str:
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - limit))
    return f.read().decode("utf-8", errors="replace")


def last_line(stderr: str) -> str:
    """': <last non-empty line>' of some output, or '' (for one-line messages)."""
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    return f": {lines[-1][:300]}" if lines else ""
