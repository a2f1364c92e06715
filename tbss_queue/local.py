"""One machine, no set-up: a private redis-server and a local worker for `tbss-queue run`.

The Redis data lives in `<cwd>/.tbss-queue/` with persistence on, so an interrupted run resumes
where it stopped. Everything started here is stopped here, also on Ctrl-C or SIGTERM: the worker
(cold shutdown, then SIGKILL), every process its commands left (found by an environment tag),
then redis-server (which writes its append-only file on the way out).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType

from tbss_queue import api
from tbss_queue.commands import parse_commands_file
from tbss_queue.config import Settings, cpu_count
from tbss_queue.errors import TbssQueueError
from tbss_queue.execution.procs import TAG_VAR, kill_tagged
from tbss_queue.execution.runner import dies_with_parent
from tbss_queue.fsl.matrix import SubjectMatrix
from tbss_queue.models import Batch, BatchStatus, TaskRecord
from tbss_queue.queue.app import make_app
from tbss_queue.queue.batches import BatchStore
from tbss_queue.queue.broker import connect
from tbss_queue.queue.recovery import reconcile
from tbss_queue.redis_server import RedisServer

RUN_DIR = ".tbss-queue"
"""Where `run` keeps its Redis data and worker log, inside the working directory."""

URL_FILE = "redis.url"
"""In RUN_DIR while a `run` works: its Redis's URL (a unix socket, maybe in /tmp when the
study's path is too long for one), for the read verbs to ask it."""


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
    resumed: int = 0
    """Commands an earlier, stopped `run` left running, queued again at the start of this one."""
    matrix: SubjectMatrix | None = None
    """The subject matrix of a failed `tbss_2_reg -n` batch (None otherwise)."""
    report: str | None = None
    """Where the HTML report was written, when asked for."""


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
    report: str | os.PathLike[str] | None = None,
    on_outage: Callable[[float | None], None] | None = None,
) -> RunResult:
    """Run a commands file to the end on this machine (or on the configured broker's workers:
    then `on_submitted` hears of the batch before the wait, so that a caller can say where it
    went and what Ctrl-C leaves running). `done_if_exists`: as for `api.submit`; it is also
    what tells a resumed run that a command which ended just before an interruption, unrecorded,
    need not run again (fsl_reg lines are told by their outputs). `report`: write the batch's
    HTML report there at the end, while its Redis still runs. `on_outage`: as for
    `api.wait` (a broker outage began, or ended)."""
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
        final = api.wait(batch.id, settings=settings, on_update=on_update, on_outage=on_outage)
        return _result(final, settings, None, started, report)
    run_dir = Path(api.workdir_for(path, cwd)) / RUN_DIR
    with (
        run_lock(run_dir),
        _sigterm_interrupts(),
        embedded(run_dir, concurrency) as (local, watch, resumed),
    ):
        batch = submit(local)

        def update(status: BatchStatus) -> None:
            watch()
            if on_update is not None:
                on_update(status)

        final = api.wait(batch.id, settings=local, on_update=update, on_outage=on_outage)
        return replace(_result(final, local, str(run_dir), started, report), resumed=resumed)


def _result(
    final: BatchStatus,
    settings: Settings,
    run_dir: str | None,
    started: float,
    report: str | os.PathLike[str] | None,
) -> RunResult:
    """Read what the ended batch left while its broker is still there to ask."""
    failed = api.failures(final.batch, settings=settings)
    subjects = api.matrix(final.batch, settings=settings) if failed else None
    if report is not None:
        api.report(final.batch, path=report, settings=settings, timeline=False)
    return RunResult(
        final,
        failed,
        run_dir is not None,
        run_dir,
        time.monotonic() - started,
        matrix=subjects,
        report=None if report is None else str(report),
    )


KEPT_IN = ("", "FA")
"""Where the read verbs look for a `run`'s kept data, under the working directory: its own
.tbss-queue (standing in FA/), then FA/.tbss-queue (standing in the study's root, where
FA/.commands is the file `run` was given)."""


def find_kept(where: str | os.PathLike[str] | None = None) -> Path | None:
    """The .tbss-queue directory a `run` kept its Redis data in, seen from `where` (cwd)."""
    base = Path(where or os.getcwd())
    for sub in KEPT_IN:
        run_dir = base / sub / RUN_DIR
        if (run_dir / "run.lock").is_file():
            return run_dir.resolve()
    return None


@contextlib.contextmanager
def kept_broker(
    settings: Settings, where: str | os.PathLike[str] | None = None, who: str = "tbss-queue"
) -> Iterator[tuple[Settings, Path | None]]:
    """The broker a read verb asks: the configured one; with none configured, the Redis data a
    `run` kept here (its own server while it runs, else a private redis-server started on the
    data for the call and stopped after). Yields the settings and the kept directory, if any."""
    run_dir = None if settings.broker_explicit else find_kept(where)
    if run_dir is None:
        yield settings, None
        return
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(run_lock(run_dir, who))
        except RunInUse:  # a `run` works there now: ask its own server
            try:
                url = (run_dir / URL_FILE).read_text().strip()
            except OSError:
                raise RunInUse(
                    f"{run_dir} is in use by a `tbss-queue run` that is starting or stopping: "
                    "ask again in a moment"
                ) from None
            yield replace(settings, broker=url, broker_explicit=True), run_dir
            return
        server = RedisServer(run_dir, persistent=True, die_with_parent=True)
        server.start()
        stack.callback(server.stop)
        yield replace(settings, broker=server.url, broker_explicit=True), run_dir


@contextlib.contextmanager
def run_lock(run_dir: Path, who: str = "tbss-queue run") -> Iterator[None]:
    """Hold `run_dir` for this `run` alone (an advisory lock the kernel releases when this
    process dies, however it dies); a second `run` is refused, saying who holds it (`who`:
    the command, a `run` or a read verb that opened the kept data)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "run.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 512, 0).decode(errors="replace").strip()
            holder, _, since = text.rpartition("|") if "|" in text else ("tbss-queue run", "", text)
            raise RunInUse(
                f"{run_dir} is in use by another `{holder}` ({since or 'another process'}): "
                "wait for it to end, or stop it first"
            ) from None
        os.ftruncate(fd, 0)
        when = time.strftime("%Y-%m-%d %H:%M:%S")
        text = f"{who}|pid {os.getpid()} on {socket.gethostname()} since {when}"
        os.pwrite(fd, text.encode(), 0)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def embedded(
    run_dir: Path, concurrency: int | None
) -> Iterator[tuple[Settings, Callable[[], None], int]]:
    """A private Redis and one local worker node; yields their settings, a liveness check and
    how many commands a stopped `run` had left running (queued again now)."""
    # an outer tag (a test, a pilot job) is kept so that its owner can find our processes too
    tag = os.environ.get(TAG_VAR) or uuid.uuid4().hex
    server = RedisServer(run_dir, persistent=True, die_with_parent=True)
    server.start()
    worker: subprocess.Popen[bytes] | None = None
    url_file = run_dir / URL_FILE
    try:
        url_file.write_text(server.url)
        settings = Settings.resolve(broker=server.url)
        # nothing can be running after a stop: put interrupted commands back in the queue.
        # Recovery would log each as "its node stopped answering": here it is the stop we
        # made, which `run` reports itself (RunResult.resumed)
        with _silenced("tbss_queue.queue.recovery"):
            counts = reconcile(make_app(settings), BatchStore(connect(settings)), settings)
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

        yield settings, watch, counts.get("requeued", 0)
    finally:
        if worker is not None:
            _stop_worker(worker)
        kill_tagged(tag)
        url_file.unlink(missing_ok=True)
        server.stop()


@contextlib.contextmanager
def _silenced(logger: str) -> Iterator[None]:
    """Drop a logger's records for a moment (what it would say is said better by the caller)."""
    target = logging.getLogger(logger)
    drop = logging.Filter(name="-")  # matches no logger name: every record is dropped
    target.addFilter(drop)
    try:
        yield
    finally:
        target.removeFilter(drop)


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
