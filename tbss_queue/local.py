"""One machine, no set-up: a private redis-server and a local worker for `tbss-queue run`.

The Redis data lives in `<cwd>/.tbss-queue/` with persistence on, so an interrupted run resumes
where it stopped. Everything started here is stopped here, also on Ctrl-C or SIGTERM: the worker
(cold shutdown, then SIGKILL), every process its commands left (found by an environment tag),
then redis-server (which writes its append-only file on the way out).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from . import api
from .app import make_app
from .batches import BatchStore
from .broker import connect
from .commands import parse_commands_file
from .config import Settings, cpu_count
from .errors import TbssQueueError
from .models import Batch, BatchStatus, TaskRecord
from .procs import TAG_VAR, kill_tagged
from .recovery import reconcile
from .redis_server import RedisServer
from .runner import dies_with_parent

RUN_DIR = ".tbss-queue"
"""Where `run` keeps its Redis data and worker log, inside the working directory."""


class Interrupted(BaseException):
    """Raised in the main thread when `run` gets SIGTERM, so that clean-up runs as for Ctrl-C."""


class RunInUse(TbssQueueError):
    """Raised when another `tbss-queue run` already works in the same study directory."""


class LocalWorkerDied(TbssQueueError):
    """Raised when the local worker process exits while the batch still has work."""


@dataclass(frozen=True)
class RunResult:
    """How a `run` ended: the batch's final status, where it ran, and how long it took."""

    status: BatchStatus
    failures: list[TaskRecord]
    embedded: bool
    run_dir: str | None
    wall_seconds: float


def run(
    path: str | os.PathLike[str],
    *,
    cwd: str | os.PathLike[str] | None = None,
    concurrency: int | None = None,
    time_limit: float | None = None,
    done_if_exists: str | None = None,
    settings: Settings | None = None,
    on_update: Callable[[BatchStatus], None] | None = None,
    on_submitted: Callable[[Batch], None] | None = None,
) -> RunResult:
    """Run a commands file to the end on this machine (or on the configured broker's workers:
    then `on_submitted` hears of the batch before the wait, so that a caller can say where it
    went and what Ctrl-C leaves running). `done_if_exists`: as for `api.submit`; it is also
    what tells a resumed run that a command which ended just before an interruption, unrecorded,
    need not run again (fsl_reg lines are told by their outputs)."""
    settings = settings or Settings.resolve()
    started = time.monotonic()
    parse_commands_file(path)  # a bad file fails before anything is started

    def submit(to: Settings) -> Batch:
        return api.submit(
            path, cwd=cwd, time_limit=time_limit, done_if_exists=done_if_exists, settings=to
        )

    if settings.broker_explicit:
        batch = submit(settings)
        if on_submitted is not None:
            on_submitted(batch)
        final = api.wait(batch.id, settings=settings, on_update=on_update)
        failed = api.failures(batch.id, settings=settings)
        return RunResult(final, failed, False, None, time.monotonic() - started)
    run_dir = Path(api.workdir_for(path, cwd)) / RUN_DIR
    with run_lock(run_dir), _sigterm_interrupts(), embedded(run_dir, concurrency) as (local, watch):
        batch = submit(local)

        def update(status: BatchStatus) -> None:
            watch()
            if on_update is not None:
                on_update(status)

        final = api.wait(batch.id, settings=local, on_update=update)
        failed = api.failures(batch.id, settings=local)
    return RunResult(final, failed, True, str(run_dir), time.monotonic() - started)


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold `run_dir` for this `run` alone (an advisory lock the kernel releases when this
    process dies, however it dies); a second `run` is refused, saying who holds it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "run.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
            raise RunInUse(
                f"{run_dir} is in use by another `tbss-queue run` ({holder}): wait for it to "
                "end, or stop it first"
            ) from None
        os.ftruncate(fd, 0)
        when = time.strftime("%Y-%m-%d %H:%M:%S")
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {when}".encode(), 0)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def embedded(
    run_dir: Path, concurrency: int | None
) -> Iterator[tuple[Settings, Callable[[], None]]]:
    """A private Redis and one local worker node; yields their settings and a liveness check."""
    # an outer tag (a test, a pilot job) is kept so that its owner can find our processes too
    tag = os.environ.get(TAG_VAR) or uuid.uuid4().hex
    server = RedisServer(run_dir, persistent=True, die_with_parent=True)
    server.start()
    worker: subprocess.Popen[bytes] | None = None
    try:
        settings = Settings.resolve(broker=server.url)
        # nothing can be running after a stop: put interrupted commands back in the queue
        reconcile(make_app(settings), BatchStore(connect(settings)), settings)
        log_path = run_dir / "worker.log"
        env = {**os.environ, "TBSS_QUEUE_BROKER": server.url, TAG_VAR: tag}
        with open(log_path, "ab") as log:
            worker = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tbss_queue",
                    "worker",
                    "--name",
                    "local",
                    "--concurrency",
                    str(concurrency or cpu_count()),
                    # a stopped run hands its commands back at once; the next run resumes them
                    "--grace",
                    "0",
                    # only this user can reach the private, owner-only socket: the file's
                    # author is the only submitter, so there is no one to guard against
                    "--allow-any",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                # SIGKILL of `run` takes its worker along (the worker's slots and their
                # guards then kill the commands)
                preexec_fn=dies_with_parent(signal.SIGKILL),  # noqa: PLW1509
            )

        def watch() -> None:
            if worker is not None and worker.poll() is not None:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-1:]
                raise LocalWorkerDied(
                    f"the local worker exited (code {worker.returncode}); see {log_path}: "
                    + (tail[0] if tail else "")
                )

        yield settings, watch
    finally:
        if worker is not None:
            _stop_worker(worker)
        kill_tagged(tag)
        server.stop()


def _stop_worker(worker: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """Cold shutdown: running commands are killed and go back to the queue for the next run."""
    if worker.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGQUIT)
        try:
            worker.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(worker.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        worker.wait(grace)


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(signum)

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread (a notebook's worker thread): leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
