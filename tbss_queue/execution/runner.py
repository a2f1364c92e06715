"""Run one command as a subprocess: own session, no shell, output tails, whole tree killed.

Deliberately free of Celery and Redis so it can be tested in milliseconds. Celery never kills a
task's child processes, so this module does: the command leads its own session and that whole
process group is killed in a `finally`, which also runs when the pool process gets SIGTERM
(time limit, revoke, shutdown) because billiard turns SIGTERM into SystemExit.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import IO, Any, Protocol

from tbss_queue.execution import guard as guard_mod
from tbss_queue.execution import memory, procs
from tbss_queue.execution.guard import TAG_VAR
from tbss_queue.sizes import human

TAIL_BYTES = 64 * 1024
"""How much of the end of stdout and of stderr is kept."""

KILL_GRACE = 2.0
"""Seconds between SIGTERM and SIGKILL when a command's process group is stopped."""

SHARED_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
"""Signals that reach a command and its worker together (Slurm's scancel under
proctrack/linuxproc signals every process of the job; Ctrl-C the whole foreground group)."""

SHARED_WAIT = 1.0
"""Seconds a command killed by one of SHARED_SIGNALS waits for its worker's own stop request
before it counts as a failure: whichever process the sender signalled first."""

# causes of failure, also used as task states by the bookkeeping
CAUSE_EXIT = "exit"
CAUSE_SIGNAL = "signal"
CAUSE_TIMEOUT = "timeout"
CAUSE_NOT_FOUND = "not-found"
CAUSE_TOO_LONG = "too-long"  # E2BIG: the command line exceeds the system's argument limit
CAUSE_NO_CWD = "no-cwd"
CAUSE_STOPPED = "stopped"  # stopped from outside (lease lost, cancelled, worker stopping)
CAUSE_OOM = "oom"  # killed by the kernel for want of memory: the node's fault


@dataclass(frozen=True)
class Stop:
    """Why a running command must stop now; `hard`: SIGKILL at once, no grace (its lease is
    gone, so another copy may already run)."""

    reason: str
    hard: bool = False


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
    peak_rss: int | None = None
    """Bytes: the most its whole process tree held (memory.Sampler)."""
    oom_rose: bool = False
    """The node's cgroup (or the machine) counted an OOM kill while it ran: if it failed, a
    process of its tree (fnirt under fsl_reg) may have been the one killed."""

    @property
    def ok(self) -> bool:
        return self.cause is None

    @property
    def duration(self) -> float:
        return self.ended - self.started

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "duration": self.duration}

    @classmethod
    def instant(cls, message: str, cause: str | None = None) -> RunResult:
        """An attempt that ended where it began, nothing run: skipped, refused, or cut short
        by an error of the worker's own."""
        now = time.time()
        return cls(None, now, now, "", "", cause, message)


@dataclass(frozen=True)
class RunSpec:
    """What to run, where, and where its output goes."""

    argv: Sequence[str]
    cwd: str
    env: Mapping[str, str] | None = None
    timeout: float | None = None
    tag: str | None = None
    """Goes into the command's environment (guard.TAG_VAR), so that the guard finds
    descendants that left its process group if this process dies."""
    outputs: tuple[IO[bytes], IO[bytes]] | None = None
    """stdout, stderr (fsl_sub's -l logs, or ours); temporary files when None."""
    executable: str | None = None
    """The file to execute (argv[0] stays what the command sees)."""
    cwd_fd: int | None = None
    """An open descriptor of the working directory, which the command starts in whatever
    `cwd` names now."""
    tail_bytes: int = TAIL_BYTES


class Pauser(Protocol):
    """What the runner asks of a command's pauses (pausing.Pausing)."""

    poll: float

    def step(self, pgid: int) -> Stop | None: ...

    def paused_for(self) -> float: ...


@dataclass(frozen=True)
class Watch:
    """How the command's owner watches it while it runs."""

    on_tick: Callable[[int], Stop | None] | None = None
    """Called about every `tick` seconds with the pid (lease renewal); may ask it to stop."""
    tick: float = 5.0
    stop: Callable[[], Stop | None] | None = None
    """Checked whenever `wake_fd` becomes readable: a stop request from outside."""
    wake_fd: int | None = None
    lease_until: Callable[[], float] | None = None
    """CLOCK_BOOTTIME seconds, handed to this process's guard, which kills the command's tree
    itself if this process is frozen past it."""
    pause: Pauser | None = None
    """The node's owner policy (pausing.py): stops and continues the command's group; its
    paused time does not count against the time limit."""
    on_sample: Callable[[int], None] | None = None
    """Told the tree's RSS every memory.SAMPLE_EVERY seconds (the node's ledger)."""


@dataclass
class _Ending:
    """How the wait for a command ended (none of these: it exited by itself)."""

    stopped: Stop | None = None
    timed_out: bool = False
    oom: bool = False
    """SIGKILLed by none of ours while the kernel counted an OOM kill."""


def run_command(spec: RunSpec, watch: Watch | None = None) -> RunResult:
    """Run a command; never raises for the command's own failures (they are in the result).

    Its whole tree is killed when it ends, when `watch` asks it to stop (the result's cause
    is then `stopped`), or at its time limit; only the last `tail_bytes` of each output are
    returned."""
    watch = watch or Watch()
    started = time.time()
    cwd = spec.cwd
    if spec.cwd_fd is not None:
        # the child's chdir goes through its copy of the descriptor (a magic link, not a path
        # looked up again); it is close-on-exec, so the command does not inherit it
        cwd = f"/proc/self/fd/{spec.cwd_fd}"
    if not os.path.isdir(cwd):
        return _failed(started, CAUSE_NO_CWD, f"working directory does not exist: {cwd}")
    env = spec.env
    if spec.tag is not None:
        env = {**(env if env is not None else os.environ), TAG_VAR: spec.tag}
    with _output(spec.outputs, 0) as out, _output(spec.outputs, 1) as err:
        guard = _guard()
        before = set(procs.children(os.getpid()))  # anything new after the command is its doing
        sampler = memory.Sampler(watch.on_sample)
        until = watch.lease_until or (lambda: 0.0)
        guard.starting(spec.tag, until())
        try:
            proc = _spawn(spec.argv, cwd, env, out, err, spec.executable)
        except OSError as exc:
            guard.ended()
            return _not_started(started, spec.argv[0], exc)
        guard.started(proc.pid, spec.tag, until())
        ending = _Ending()
        try:
            ending = _wait(proc, started, spec, watch, sampler)
        finally:
            _end_tree(proc, before, hard=ending.stopped is not None and ending.stopped.hard)
        if (
            ending.stopped is None
            and watch.stop is not None
            and proc.returncode is not None
            and -proc.returncode in SHARED_SIGNALS
        ):
            ending.stopped = _stop_noted(watch.stop, watch.wake_fd)
        ended = time.time()
        tails = _tail(out, spec.tail_bytes), _tail(err, spec.tail_bytes)
        # the kill count is read again only when it matters: the command failed
        peak, rose = sampler.ended(), proc.returncode != 0 and sampler.oom_rose()
        ending.oom = ending == _Ending() and rose and proc.returncode != 0
    result = RunResult(proc.returncode, started, ended, *tails, peak_rss=peak, oom_rose=rose)
    return _verdict(result, ending, spec.timeout)


def _not_started(started: float, program: str, exc: OSError) -> RunResult:
    """The result of a command that could not be started at all."""
    if isinstance(exc, FileNotFoundError):
        return _failed(started, CAUSE_NOT_FOUND, f"executable not found: {program}")
    if isinstance(exc, PermissionError):
        why = f"executable not runnable (permission denied): {program}"
        return _failed(started, CAUSE_NOT_FOUND, why)
    cause = CAUSE_TOO_LONG if exc.errno == errno.E2BIG else CAUSE_NOT_FOUND
    return _failed(started, cause, f"cannot start {program}: {exc.strerror or exc}")


def _wait(
    proc: subprocess.Popen[bytes],
    started: float,
    spec: RunSpec,
    watch: Watch,
    sampler: memory.Sampler,
) -> _Ending:
    """Wait for the command to end, ticking: a stop request, the time limit, or the owner's
    tick (lease renewal) may end it sooner; the guard hears of every renewal. Its memory is
    sampled in between (memory.SAMPLE_EVERY)."""
    until = watch.lease_until or (lambda: 0.0)
    pause = watch.pause
    next_tick = time.monotonic() + watch.tick
    woken = [False]  # the last wait ended by wake_fd (a stop request, a nudge): act at once
    with _exit_watch(proc, watch.wake_fd, woken) as exited:
        while True:
            deadline = _deadline(started, spec.timeout, pause)
            wait = max(0.0, next_tick - time.monotonic())
            wait = wait if pause is None else min(wait, pause.poll)
            wait = wait if deadline is None else max(0.0, min(wait, deadline - time.time()))
            wait = min(wait, memory.SAMPLE_EVERY)  # its memory is sampled in between
            if exited(wait):
                return _Ending()
            sampler.sample(proc.pid)
            stopped = watch.stop() if watch.stop is not None else None
            if stopped is None and pause is not None:
                stopped = pause.step(proc.pid)
            deadline = _deadline(started, spec.timeout, pause)
            if stopped is None and deadline is not None and time.time() >= deadline:
                return _Ending(timed_out=True)
            if stopped is None and time.monotonic() < next_tick and not woken[0]:
                continue  # a look for the owner policy only
            next_tick = time.monotonic() + watch.tick
            if stopped is None and watch.on_tick is not None:
                stopped = watch.on_tick(proc.pid)
            if stopped is not None:
                return _Ending(stopped)
            # a new guard if the last one died
            _guard().started(proc.pid, spec.tag, until())


def _deadline(started: float, timeout: float | None, pause: Pauser | None) -> float | None:
    """When the command's time limit is reached: paused time does not count."""
    if timeout is None:
        return None
    return started + timeout + (pause.paused_for() if pause is not None else 0.0)


def _end_tree(proc: subprocess.Popen[bytes], before: set[int], hard: bool) -> None:
    """Kill the command's process group (at once when `hard`), then whatever left it."""
    kill_process_group(proc.pid, grace=0.0 if hard else KILL_GRACE)
    with contextlib.suppress(Exception):
        proc.wait(timeout=KILL_GRACE)
    guard = _guard()
    # what left the group (setsid, daemons; environment cleared or not): this process is
    # their subreaper, so they are among its descendants
    kill_strays(keep=before | guard.pids())
    guard.ended()


def _verdict(result: RunResult, ending: _Ending, timeout: float | None) -> RunResult:
    """The cause and message of how the command ended."""
    code, stderr = result.exit_code, result.stderr_tail
    if ending.stopped is not None:
        why = f"stopped: {ending.stopped.reason}; process tree killed"
        return replace(result, cause=CAUSE_STOPPED, message=why)
    if ending.timed_out:
        why = f"time limit of {timeout:g} s reached; process group killed"
        return replace(result, cause=CAUSE_TIMEOUT, message=why)
    if ending.oom:
        why = oom_message(result.peak_rss) + f" ({_how(code)})"
        return replace(result, cause=CAUSE_OOM, message=why + last_line(stderr))
    if code is not None and code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        return replace(
            result, cause=CAUSE_SIGNAL, message=f"killed by signal {name}" + last_line(stderr)
        )
    if code != 0:
        return replace(result, cause=CAUSE_EXIT, message=f"exit code {code}" + last_line(stderr))
    return result


def oom_message(peak: int | None) -> str:
    return f"killed by the kernel for want of memory (OOM) at a peak of {human(peak or 0)}"


def _how(code: int | None) -> str:
    """How a command ended, as its exit status says."""
    if code is not None and code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        return f"killed by signal {name}"
    return f"exit code {code}"


def _stop_noted(stop: Callable[[], Stop | None], wake_fd: int | None) -> Stop | None:
    """The stop request that arrives within SHARED_WAIT of the command's death, if any: the
    command was killed by the signal that is stopping its worker too, so it is stopped (handed
    back), not failed."""
    deadline = time.monotonic() + SHARED_WAIT
    while (stopped := stop()) is None and (left := deadline - time.monotonic()) > 0:
        if wake_fd is None:
            time.sleep(min(left, 0.05))
        else:
            select.select([wake_fd], [], [], left)
    return stopped


def _spawn(
    argv: Sequence[str],
    cwd: str,
    env: Mapping[str, str] | None,
    out: IO[bytes],
    err: IO[bytes],
    executable: str | None = None,
) -> subprocess.Popen[bytes]:
    """Start the command in its own session. No preexec_fn and no exec wrapper, so Python
    takes its vfork path (a full fork of the large pool process cost milliseconds): the guard,
    told of the command's tag before the spawn, kills it if this process dies."""
    return subprocess.Popen(
        list(argv),
        executable=executable,
        cwd=cwd,
        env=dict(env) if env is not None else None,
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=err,
        start_new_session=True,
    )


@contextlib.contextmanager
def _exit_watch(
    proc: subprocess.Popen[bytes], wake_fd: int | None = None, woken: list[bool] | None = None
) -> Iterator[Callable[[float], bool]]:
    """exited(timeout): wait up to timeout seconds for the command to end, waking the moment
    it does (a pidfd on Linux; Popen.wait polls with growing sleeps otherwise) or the moment
    `wake_fd` becomes readable (a stop request: its bytes are drained)."""
    watch = [wake_fd] if wake_fd is not None else []
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        fd = None

    def exited(timeout: float) -> bool:
        if fd is not None:
            ready, _, _ = select.select([fd, *watch], [], [], timeout)
            if woken is not None:
                woken[0] = wake_fd is not None and wake_fd in ready
            if wake_fd is not None and wake_fd in ready:
                with contextlib.suppress(BlockingIOError, OSError):
                    os.read(wake_fd, 512)
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
_PR_SET_PDEATHSIG = 1


def dies_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A Popen preexec_fn: the child gets `sig` when the process that started it dies, even
    by SIGKILL (Linux; None elsewhere). For a command, whose runner's `finally` can't run then
    (the slot's guard takes care of its grandchildren), and for `run`'s Redis and worker."""
    prctl = _PRCTL
    if prctl is None:
        return None

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sig)

    return preexec


def kill_process_group(pgid: int, grace: float = KILL_GRACE) -> None:
    """SIGTERM the group, give it `grace` seconds, then SIGKILL what is left (at once if 0)."""
    try:
        os.killpg(pgid, signal.SIGTERM if grace > 0 else signal.SIGKILL)
        # a stopped group (a paused command: pausing.py) hears SIGTERM only once continued
        os.killpg(pgid, signal.SIGCONT)
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


class _Guard:
    """This process's guard (guard.py) and the slot of memory it reads: what this process
    writes there before, during and after each command."""

    def __init__(self, slot: guard_mod.Slot | None = None) -> None:
        self.pid = os.getpid()
        self.slot = slot or guard_mod.Slot.create()
        self.proc: subprocess.Popen[bytes] | None = None
        with contextlib.suppress(OSError):
            self.proc = subprocess.Popen(
                [sys.executable, "-S", "-I", guard_mod.__file__, str(self.slot.fd)],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=(self.slot.fd,),
                # not in the worker's process group: a signal to that group must not reach it
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.pid == os.getpid() and self.proc is not None and self.proc.poll() is None

    def pids(self) -> set[int]:
        return {self.proc.pid} if self.proc is not None else set()

    def starting(self, tag: str | None, until: float) -> None:
        self.slot.write(0, tag or "", until)

    def started(self, pgid: int, tag: str | None, until: float) -> None:
        self.slot.write(pgid, tag or "", until)

    def ended(self) -> None:
        self.slot.clear()


_GUARD: _Guard | None = None
_PR_SET_CHILD_SUBREAPER = 36


def _guard() -> _Guard:
    """The guard of this process, started on first use, again after a fork, and again if it
    died (killed by someone: the new one reads the same slot, so it guards the running command
    from its first look)."""
    global _GUARD
    if _GUARD is None or not _GUARD.alive():
        slot = None
        if _GUARD is None or _GUARD.pid != os.getpid():
            _become_subreaper()
        else:
            slot = _GUARD.slot
            if _GUARD.proc is not None:
                with contextlib.suppress(Exception):
                    _GUARD.proc.wait(0)  # reap the dead one
        _GUARD = _Guard(slot)
    return _GUARD


def _become_subreaper() -> None:
    """Orphans of this process's commands (double forks, daemons, `setsid`, `env -i`) become
    this process's children instead of init's, so they can be found and killed."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_CHILD_SUBREAPER, 1)


def kill_strays(keep: set[int]) -> list[int]:
    """SIGKILL every descendant of this process but `keep` (the guard, children it had before)
    and reap them: what a command left running after it ended. Cheap: a few /proc files, no
    scan of every process. Orphans of the killed come to this process (subreaper): next round."""
    killed: list[int] = []
    for _ in range(3):
        direct = [c for c in procs.children(os.getpid()) if c not in keep]
        found, todo = [], list(direct)
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo += procs.children(pid)
        if not found:
            break
        for pid in found:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        for pid in direct:  # ours, and SIGKILLed: the wait is short
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, 0)
        killed += found
    return killed


@contextlib.contextmanager
def _output(outputs: tuple[IO[bytes], IO[bytes]] | None, which: int) -> Iterator[IO[bytes]]:
    if outputs is not None:
        yield outputs[which]
        return
    with tempfile.TemporaryFile() as f:
        yield f


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
