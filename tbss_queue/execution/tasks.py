"""The one Celery task: claim the command under a lease, run it, record the outcome.

One owner per command. The claim gives a runner a lease (a token in Redis, expiring after
LOST_AFTER) that only this runner renews, at every heartbeat; whatever the old owner of a command
does after losing it (renew, record, hand back) is refused by the scripts, which compare tokens.
A runner whose renewal answers "not yours" or "cancelled", or that could not renew for
LOST_AFTER minus two heartbeats (a frozen machine, a cut network), kills its command's whole
tree at once and records nothing: by the time the reaper can give the command to another node
(LOST_AFTER after the last renewal), this copy is gone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import redis
from billiard.process import current_process
from celery import Celery, Task
from celery.exceptions import Ignore, Retry, TaskPredicate

from tbss_queue.config import Settings
from tbss_queue.execution import environment, nudges, runner
from tbss_queue.execution.done import done_marker, judge_done, remove_stale
from tbss_queue.execution.fields import RefusedField, check_fields, log_names, open_logs
from tbss_queue.execution.guard import uptime
from tbss_queue.execution.logs import log_stem, open_attempt_logs
from tbss_queue.execution.policy import Policy, locate
from tbss_queue.execution.preflight import CAUSE_LATE, CAUSE_REFUSED, admit, fault, workdir_fault
from tbss_queue.fsl.jobs import with_fsl_sub_env
from tbss_queue.opening import opened_workdir
from tbss_queue.paths import PathMap, local_fsl_tool
from tbss_queue.queue.app import TASK_NAME
from tbss_queue.queue.batches import FAILED, SKIPPED, SUCCEEDED, BatchStore
from tbss_queue.queue.broker import connect, replicated, transient
from tbss_queue.queue.publish import RECORD_BUDGET, START_BUDGET, label
from tbss_queue.queue.recovery import republish

log = logging.getLogger(__name__)
T = TypeVar("T")

CAUSE_MISSING_OUTPUT = "missing output"
CAUSE_WORKER_ERROR = "worker error"
LATE_LIMIT = 3
"""Leases a node's runners may lose by renewing late, within LATE_WINDOW, before it is
quarantined (cause CAUSE_LATE)."""
LATE_WINDOW = 10
"""The span, in LOST_AFTER periods, over which a node's late renewals are counted."""
RETRY_DELAY = 5.0
"""Seconds before a failed command is tried again (`--retries`)."""


class CommandFailed(Exception):
    """Raised (into Celery, so Flower shows FAILURE) when a command did not succeed."""


@dataclass(frozen=True)
class NodeRules:
    """What this worker node applies to every command: its path map, policy and time cap."""

    path_map: PathMap | None = None
    policy: Policy | None = None
    max_time_limit: float | None = None
    pass_env: tuple[str, ...] = ()
    """Variables the operator passes on to commands (`--pass-env`), beyond the allowlist."""


def command_env(batch_id: str, task_id: str, extra: tuple[str, ...] = ()) -> dict[str, str]:
    """The environment a command runs in: an allowlist of the worker's (environment.py), never
    its secrets, plus what FSL tools need."""
    return environment.command_env(os.environ, batch_id, task_id, extra)


def patiently(fn: Callable[[], T], patience: float) -> T:
    """Call fn, waiting out a passing Redis fault (restart, BUSY, LOADING, OOM, MISCONF,
    READONLY, TRYAGAIN) with exponential backoff for up to `patience` seconds."""
    deadline = time.monotonic() + patience
    delay = 0.1
    while True:
        try:
            return fn()
        except redis.RedisError as exc:
            if not transient(exc) or time.monotonic() > deadline:
                raise
            log.warning("broker trouble (%s); trying again in %.1f s", exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


class Lease:
    """This runner's hold on one command: renewed at every tick, fenced by its token."""

    def __init__(
        self, settings: Settings, store: BatchStore, batch_id: str, task_id: str, token: str
    ) -> None:
        self.settings, self.batch_id, self.task_id, self.token = settings, batch_id, task_id, token
        # a short socket timeout: a renewal must never block the tick loop past the lease
        self.store = BatchStore(connect(settings, check=False, timeout=settings.heartbeat / 2))
        self.margin = settings.runner_margin
        # by a clock that counts while the machine is suspended, shared with the guard process
        self.valid_until = uptime() + self.margin

    def lapsed(self) -> bool:
        return uptime() >= self.valid_until

    def renew(self, _pid: int = 0) -> runner.Stop | None:
        """None to go on, or why the command must stop now."""
        if self.lapsed():
            return runner.Stop(
                f"could not renew its lease for {self.margin:g} s (machine paused or broker "
                "unreachable); another node may run it now",
                hard=True,
            )
        sent = uptime()
        try:
            verdict = self.store.renew(
                self.batch_id, self.task_id, self.token, self.settings.lost_after
            )
        except redis.RedisError as exc:
            log.warning("lease renewal of %s failed (%s); trying again", self.task_id, exc)
            return None
        if verdict == "ok":
            self.valid_until = sent + self.margin
            return None
        if verdict == "cancelled":
            return runner.Stop("cancelled")
        return runner.Stop("its lease was taken over: another node runs it now", hard=True)


class Interrupts:
    """SIGTERM while a command is handled here (the worker's cold shutdown, Celery's hard time
    limit) is noted, not raised: a running command is stopped and handed back, a finished one's
    record lands first; then the pool process exits as it was told to."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # when this attempt began: Celery's hard limit counts from about here, START_BUDGET too
        self.began = time.monotonic()

    def _note(self, signum: int, frame: object) -> None:
        self.signum = signum
        with contextlib.suppress(OSError):
            os.write(self.write_fd, b"!")

    def stop(self) -> runner.Stop | None:
        return runner.Stop("the worker is stopping") if self.signum is not None else None

    @contextlib.contextmanager
    def installed(self) -> Iterator[Interrupts]:
        previous = signal.signal(signal.SIGTERM, self._note)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, previous)
            os.close(self.read_fd)
            os.close(self.write_fd)
            if self.signum is not None:
                raise SystemExit(128 + self.signum)


def execute(
    task: Task,
    settings: Settings,
    rules: NodeRules,
    batch_id: str,
    task_id: str,
    argv: list[str],
    cwd: str,
    **options: Any,
) -> dict[str, Any]:
    """Run one command of a batch, exactly once as far as the records can tell."""
    store = BatchStore(connect(settings, check=False))
    node = task.request.hostname or "unknown"
    token = uuid.uuid4().hex
    with Interrupts().installed() as interrupts:
        try:
            return _execute(
                task, settings, rules, interrupts, store, node, token,
                batch_id, task_id, argv, cwd, options,
            )  # fmt: skip
        except (TaskPredicate, CommandFailed):
            raise
        except Exception as exc:
            if transient(exc):
                # the broker failed us past all patience, not the command: back to the queue
                # if Redis takes it now, else to the reaper once the lease lapses
                _hand_back(task.app, store, settings, batch_id, task_id, token)
            else:
                # whatever broke in this worker, the attempt ends now and says why, rather
                # than stay claimed until its lease lapses and count as a lost node, again
                _record_error(store, node, token, batch_id, task_id, exc)
            raise


def _execute(
    task: Task,
    settings: Settings,
    rules: NodeRules,
    interrupts: Interrupts,
    store: BatchStore,
    node: str,
    token: str,
    batch_id: str,
    task_id: str,
    argv: list[str],
    cwd: str,
    options: dict[str, Any],
) -> dict[str, Any]:
    roots = rules.policy.roots if rules.policy is not None else ()
    patience = 10 * settings.lost_after
    try:
        # roots bound the working directory after this node's path map: policy.check
        fields = check_fields(batch_id, task_id, argv, cwd, options)
    except RefusedField as exc:
        # a message submit never writes: forged, or from an incompatible version
        log.error("refused a task message: %s", exc)
        if exc.field not in ("batch_id", "command_id"):
            refuse(
                store, settings, batch_id, task_id, node, task.request.id, str(exc),
                token=token, patience=patience,
            )  # fmt: skip
        raise Ignore() from None
    if rules.path_map:
        argv, cwd = rules.path_map.argv(fields.argv), rules.path_map.apply(fields.cwd)
    argv = [local_fsl_tool(argv[0], os.environ), *argv[1:]]
    claim = _claim(store, settings, batch_id, task_id, node, token, task.request.id, patience)
    if claim in ("quarantined", "leased"):
        # quarantined: this node takes no command until its fault is fixed; leased: an earlier
        # runner still holds it after all this time. Back to the front of the queue, unclaimed
        if claim == "quarantined":
            time.sleep(settings.heartbeat)
        store.owe(batch_id, task_id)  # paid by the republish, or by a reaper if that is lost
        republish(task.app, store, settings, batch_id, task_id)
        raise Ignore()
    if claim != "ok":
        raise Ignore()  # finished, cancelled, or running elsewhere: a duplicate message
    with contextlib.suppress(redis.RedisError):
        # a claim a replica holds survives a failover; one lost with the master shows at the
        # first renewal on the new master ("lost"), which kills this copy within a heartbeat
        replicated(store.r, settings)
    lease = Lease(settings, store, batch_id, task_id, token)
    line, attempt = patiently(lambda: store.attempt_of(batch_id, task_id), patience)

    def record_end(state: str, record: dict[str, Any], *, ran: bool = True) -> str:
        def finish() -> str:
            return store.finish(batch_id, task_id, node, token, state, record, ran=ran)

        by = time.monotonic() + RECORD_BUDGET  # both tries below share it: see HARD_LIMIT_MARGIN
        outcome = patiently(finish, RECORD_BUDGET)
        if outcome == "ok":
            try:
                replicated(store.r, settings)
            except redis.RedisError:
                # the master went away before a replica confirmed the record: write it again
                # on the new master ('not-owner' there means it had arrived)
                with contextlib.suppress(redis.RedisError):
                    patiently(finish, max(0.0, by - time.monotonic()))
        return outcome

    env = with_fsl_sub_env(
        command_env(batch_id, task_id, rules.pass_env), fields.job_id, fields.line, fields.job_tasks
    )
    with contextlib.ExitStack() as held:
        # the directory is opened once, below its --root, no symlink followed; from here on
        # the worker reads, removes and starts everything in it by this descriptor
        try:
            workdir = held.enter_context(opened_workdir(cwd, roots))
        except OSError as exc:
            unopened = workdir_fault(cwd, exc, roots)
            _hand_back_fault(task, store, settings, batch_id, task_id, node, token, unopened)
        cannot, program = admit(argv, workdir.path, env, rules.policy)
        if cannot is not None:
            _hand_back_fault(task, store, settings, batch_id, task_id, node, token, cannot)
        # argv[0] as found (what the command sees); `program`, the file judged, is executed
        argv = [locate(argv[0], workdir.path, env) or program, *argv[1:]]
        marker = done_marker(argv, workdir.path, fields.done_if_exists, workdir.fd)
        done, unsafe = judge_done(marker)
        if unsafe is not None:
            why = f"refused: {unsafe}"
            failed = _nothing_ran(store, batch_id, task_id, node, why, CAUSE_REFUSED)
            outcome = record_end(FAILED, failed, ran=False)
            _log_outcome(outcome, label(fields.argv), task_id, batch_id)
            raise CommandFailed(why)
        if done and marker is not None:
            done_rec = _nothing_ran(
                store, batch_id, task_id, node, f"already done: {marker.describe()}"
            )
            record_end(SKIPPED, done_rec, ran=False)
            raise Ignore()
        if marker is not None:
            _go_on_if_still_ours(task.app, store, settings, lease, node, token, "removing outputs")
            remove_stale(argv, workdir.path, roots, workdir.fd)
        time_limit = fields.time_limit or settings.time_limit
        if rules.max_time_limit:
            time_limit = min(time_limit, rules.max_time_limit)
        names = log_names(fields)
        _go_on_if_still_ours(task.app, store, settings, lease, node, token, "starting")
        if (waited := time.monotonic() - interrupts.began) > START_BUDGET:
            # its own time limit would count from a spawn so late that Celery's hard limit,
            # counted from the delivery, could cut it short: another attempt starts it afresh
            log.warning(
                "command %s of batch %s waited %.0f s to start (over %d s): handed back",
                task_id, batch_id, waited, START_BUDGET,
            )  # fmt: skip
            _hand_back(task.app, store, settings, batch_id, task_id, token)
            raise Ignore()
        with contextlib.ExitStack() as files:
            outputs, log_error = None, None
            if fields.log_dir is not None and names is not None:
                try:
                    outputs = open_logs(workdir.path, fields.log_dir, names, roots, workdir.fd)
                    for opened in outputs:
                        files.enter_context(opened)
                except (RefusedField, OSError) as exc:
                    refused = fault(CAUSE_REFUSED, f"log files: {exc}", None)
                    _hand_back_fault(task, store, settings, batch_id, task_id, node, token, refused)
            else:  # fsl_sub's -l logs, or ours: never both
                stem = log_stem(line, attempt, fields.argv)
                # the real path, as the policy judged it against the --roots (symlinks resolved)
                outputs, log_error = open_attempt_logs(
                    workdir.path, batch_id, stem, roots, workdir.fd
                )
                for opened in outputs or ():
                    files.enter_context(opened)
            log.info(
                "batch %s, command %s: running %s (in %s)", batch_id, task_id, shlex.join(argv), cwd
            )
            with nudges.watching(store.r, batch_id, interrupts.write_fd):
                result = runner.run_command(
                    argv,
                    workdir.path,
                    env=env,
                    timeout=time_limit,
                    on_tick=lease.renew,
                    tick=settings.heartbeat,
                    stop=interrupts.stop,
                    wake_fd=interrupts.read_fd,
                    tag=token,
                    lease_until=lambda: lease.valid_until,
                    outputs=outputs,
                    executable=program,
                    cwd_fd=workdir.fd,
                )
        if result.cause in (runner.CAUSE_NO_CWD, runner.CAUSE_NOT_FOUND):
            missing = cwd if result.cause == runner.CAUSE_NO_CWD else argv[0]
            cannot = fault(result.cause, result.message, missing)
            _hand_back_fault(task, store, settings, batch_id, task_id, node, token, cannot)
        if result.cause in (runner.CAUSE_SIGNAL, runner.CAUSE_STOPPED) and lease.lapsed():
            # this runner could not renew in time (frozen, overloaded, cut off) and it or the
            # guard killed the command: the node's fault, not the command's, perhaps not ours
            result = replace(result, cause=runner.CAUSE_STOPPED, message="stopped: lease ran out")
            _count_late(task.app, store, settings, node)
        if result.cause == runner.CAUSE_STOPPED:
            _stopped(task, store, settings, batch_id, task_id, token, result, label(fields.argv))
        if result.ok and marker is not None:
            done, unsafe = judge_done(marker)
        if result.ok and marker is not None and not done:
            # fsl_reg exits 0 even when flirt or fnirt failed: only its outputs tell
            what = unsafe or f"{marker.describe()} is missing or empty"
            result = replace(
                result,
                cause=CAUSE_MISSING_OUTPUT,
                message=f"exit code 0 but {what}" + runner.last_line(result.stderr_tail),
            )
    record = {
        **result.to_dict(),
        "node": node,
        # the pool process's number; 0 outside a prefork pool (solo, threads)
        "slot": getattr(current_process(), "index", 0),
        "argv": argv,
        "cwd": cwd,
        # the claim's count: every attempt, in any worker, has its own number and log files
        "attempt": attempt,
        "line": line,
    }
    if log_error is not None:
        record["log_error"] = log_error
    if result.ok:
        outcome = record_end(SUCCEEDED, record)
        _log_outcome(outcome, label(fields.argv), task_id, batch_id)
        return {"exit_code": result.exit_code, "duration": round(result.duration, 3), "node": node}
    if task.request.retries < fields.retries and result.cause != runner.CAUSE_TOO_LONG:
        # owed a message in RETRY_DELAY: Celery's retry sends it; if this hand-back's reply is
        # lost (or this process dies), a reaper does, within a heartbeat of when it was due
        back = patiently(
            lambda: store.hand_back(batch_id, task_id, token, RETRY_DELAY, record), patience
        )
        if back == "requeued":
            try:
                task.retry(
                    countdown=RETRY_DELAY,
                    max_retries=fields.retries,
                    exc=CommandFailed(result.message),
                )
            except Retry:
                with contextlib.suppress(redis.RedisError):
                    store.paid(batch_id, task_id)
                raise
        raise Ignore()
    outcome = record_end(FAILED, record)
    _log_outcome(outcome, label(fields.argv), task_id, batch_id)
    raise CommandFailed(result.message)


def _claim(
    store: BatchStore,
    settings: Settings,
    batch_id: str,
    task_id: str,
    node: str,
    token: str,
    attempt: str,
    patience: float,
    *,
    wait: float | None = None,
) -> str:
    """Claim, waiting while the runner of an earlier attempt still holds the lease (a command
    cancelled and queued again: that runner lets go at its next renewal, or its lease lapses),
    for `wait` seconds (default: until that lease has surely lapsed)."""
    if wait is None:
        wait = settings.lost_after + 2 * settings.heartbeat
    deadline = time.monotonic() + wait
    while True:
        claim = patiently(
            lambda: store.claim(
                batch_id, task_id, node, token, settings.lost_after, os.getpid(), attempt
            ),
            patience,
        )
        if claim != "leased" or time.monotonic() > deadline:
            return claim
        time.sleep(min(1.0, settings.heartbeat))


def _hand_back_fault(
    task: Task,
    store: BatchStore,
    settings: Settings,
    batch_id: str,
    task_id: str,
    node: str,
    token: str,
    fault: dict[str, Any],
) -> None:
    """The command can't start on this node: back to the queue, behind what waits, and the node
    goes on with other work (or the command failed, if every node taking commands refused it).
    Always raises."""
    outcome = patiently(
        lambda: store.node_fault(
            batch_id, task_id, node, token, fault, settings.lost_after, settings.heartbeat
        ),
        10 * settings.lost_after,
    )
    if outcome in ("requeued", "again"):
        if outcome == "requeued":
            log.error("cannot run this command here, taking others: %s", fault["message"])
        else:  # taken here again: let another node come to it first
            time.sleep(settings.heartbeat)
        republish(task.app, store, settings, batch_id, task_id, front=False)
        raise Ignore()
    if outcome == "failed":
        raise CommandFailed(fault["message"])
    raise Ignore()


def _go_on_if_still_ours(
    app: Celery,
    store: BatchStore,
    settings: Settings,
    lease: Lease,
    node: str,
    token: str,
    step: str,
) -> None:
    """Renew the lease as the last step before `step` (removing outputs, starting the command):
    a runner held since its claim (a slow done check, a slow round trip) may have lost the
    command to another node meanwhile, and then must touch nothing. Raises Ignore if so."""
    stop = lease.renew()
    if stop is None:
        return
    log.warning(
        "command %s of batch %s not ours any more before %s (%s): nothing done",
        lease.task_id, lease.batch_id, step, stop.reason,
    )  # fmt: skip
    if not stop.hard:  # cancelled meanwhile: let the lease go
        _hand_back(app, store, settings, lease.batch_id, lease.task_id, token)
    elif lease.lapsed():
        _count_late(app, store, settings, node)
    raise Ignore()


def _count_late(app: Celery, store: BatchStore, settings: Settings, node: str) -> None:
    """One more lease this node lost by being late; LATE_LIMIT of them within LATE_WINDOW
    lost-after periods quarantine it, so that its commands run elsewhere instead of being
    started and killed there again and again."""
    window = LATE_WINDOW * settings.lost_after
    margin = settings.runner_margin
    message = (
        f"its runners lost {LATE_LIMIT} leases within {window:g} s, each time {margin:g} s "
        "without a renewal (the machine paused or overloaded, or Redis slow to reach from it)"
    )
    try:
        n, quarantined = store.late_renewal(
            node, LATE_LIMIT, window, fault(CAUSE_LATE, message, None)
        )
    except redis.RedisError:
        return  # the broker is what kept the renewals from arriving: the lease says the rest
    log.warning("lease lost by a late renewal (%d of %d before quarantine)", n, LATE_LIMIT)
    if quarantined:
        log.error("node quarantined, taking no more commands: %s", message)
        app.control.cancel_consumer(settings.queue, destination=[node], reply=False)


def _stopped(
    task: Task,
    store: BatchStore,
    settings: Settings,
    batch_id: str,
    task_id: str,
    token: str,
    result: runner.RunResult,
    name: str,
) -> None:
    """The command was stopped from outside; its tree is dead. Record nothing. Always raises."""
    log.warning("%s (command %s of batch %s) %s", name, task_id, batch_id, result.message)
    _hand_back(task.app, store, settings, batch_id, task_id, token)
    raise Ignore()


def _hand_back(
    app: Celery, store: BatchStore, settings: Settings, batch_id: str, task_id: str, token: str
) -> None:
    """Give the command up unfailed, if `token` still holds it: cancelled, this releases the
    lease; else it goes back to the front of the queue. Not ours any more: nothing is done."""
    with contextlib.suppress(redis.RedisError):
        if store.hand_back(batch_id, task_id, token) == "requeued":
            republish(app, store, settings, batch_id, task_id)


def refuse(
    store: BatchStore,
    settings: Settings,
    batch_id: str,
    task_id: str,
    node: str,
    attempt: str,
    message: str,
    *,
    token: str | None = None,
    patience: float = 0.0,
) -> None:
    """Fail a command whose message this worker will not run (a field that does not pass the
    checks, a signature that does not hold), saying why: it must not stay queued for ever.
    `patience`: how long to wait out a passing Redis fault (none in the consumer's loop)."""
    token = token or uuid.uuid4().hex
    if _claim(store, settings, batch_id, task_id, node, token, attempt, patience, wait=0) != "ok":
        return
    refused = _nothing_ran(store, batch_id, task_id, node, f"refused: {message}", CAUSE_REFUSED)
    patiently(
        lambda: store.finish(batch_id, task_id, node, token, FAILED, refused, ran=False), patience
    )


def _nothing_ran(
    store: BatchStore,
    batch_id: str,
    task_id: str,
    node: str,
    message: str,
    cause: str | None = None,
) -> dict[str, Any]:
    """The record of a claimed attempt in which nothing ran (skipped, refused, or cut short by
    the worker's own error): numbered and placed like any other, recorded with ran=False."""
    line, attempt = store.attempt_of(batch_id, task_id)
    return {
        **runner.RunResult.instant(message, cause).to_dict(),
        "node": node,
        "slot": getattr(current_process(), "index", 0),
        "line": line,
        "attempt": attempt,
    }


def _record_error(
    store: BatchStore, node: str, token: str, batch_id: str, task_id: str, exc: Exception
) -> None:
    """Fail the attempt `token` holds with the worker's error (nothing is recorded if it holds
    none: the error came before the claim, or after the outcome was written)."""
    try:
        message = f"tbss-queue could not run it on {node}: {exc} ({type(exc).__name__})"
        record = _nothing_ran(store, batch_id, task_id, node, message, CAUSE_WORKER_ERROR)
        store.finish(batch_id, task_id, node, token, FAILED, record, ran=False)
    except Exception as lost:  # its lease lapses, and the reaper takes the command back
        log.error(
            "could not record the error of command %s of batch %s: %s", task_id, batch_id, lost
        )


def _log_outcome(outcome: str, name: str, task_id: str, batch_id: str) -> None:
    if outcome not in ("ok", "cancelled"):
        log.warning(
            "outcome of %s (command %s of batch %s) not recorded: %s",
            name, task_id, batch_id, outcome,
        )  # fmt: skip


def register(app: Celery, settings: Settings, rules: NodeRules | None = None) -> None:
    """Attach the task to `app`, closing over the settings the worker was started with."""
    node_rules = rules or NodeRules()

    @app.task(name=TASK_NAME, bind=True, throws=(CommandFailed,))
    def run_command(
        self: Task, batch_id: str, task_id: str, argv: list[str], cwd: str, **options: Any
    ) -> dict[str, Any]:
        # options: the per-batch ones publish.task_kwargs sends (time_limit, retries, ...)
        return execute(self, settings, node_rules, batch_id, task_id, argv, cwd, **options)
