"""One attempt of one command on this node, top to bottom. Each stage decides one thing and
hands the next a frozen object; a stage that ends the attempt early raises (Celery's Ignore,
or CommandFailed) after saying why in the batch's records.

1. checked   the message's fields (fields.py): a forged or foreign one is refused
2. resolved  the command as this node runs it: path map, FSL tool, environment, time limit
3. prepared  node preflight (preflight.py): the working directory opened below --root, the
             program judged by the policy; a node fault is recorded under a claim, and the
             command handed back
4. claimed   the claim and its lease (lease.py): one owner, whose token fences every write
5. settled   the done marker (done.py): skipped if its outputs exist, stale ones removed
6. ran       started while the lease surely holds, run by runner.py with its guard, judged
7. recorded  the outcome, written once by the lease's owner (record.py)

What the preflight found is used, not looked up again: the directory by its descriptor, the
program by the real path that was judged, whatever their names point to after the claim.
Every outcome (a node fault, a skip, a refusal, a result) is recorded under the lease.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from celery import Task
from celery.exceptions import Ignore

from tbss_queue.execution import environment, nudges, oom, pausing, resources, runner
from tbss_queue.execution.done import DoneMarker, done_marker, judge_done, remove_stale
from tbss_queue.execution.fields import RefusedField, TaskFields, check_fields, open_logs
from tbss_queue.execution.fields import log_names as fsl_sub_log_names
from tbss_queue.execution.interrupts import Interrupts
from tbss_queue.execution.lease import (
    Attempt,
    Claim,
    CommandFailed,
    claimed,
    count_late,
    go_on_if_still_ours,
    hand_back,
    hand_back_fault,
)
from tbss_queue.execution.logs import log_stem, open_attempt_logs
from tbss_queue.execution.policy import Policy, locate
from tbss_queue.execution.preflight import CAUSE_REFUSED, admit, fault, workdir_fault
from tbss_queue.execution.record import (
    attempt_record,
    log_outcome,
    nothing_ran,
    outcome,
    record_end,
    refuse,
)
from tbss_queue.fsl.jobs import with_fsl_sub_env
from tbss_queue.opening import WorkDir, opened_workdir
from tbss_queue.paths import PathMap, local_fsl_tool
from tbss_queue.queue.keys import FAILED, SKIPPED
from tbss_queue.queue.publish import START_BUDGET, label

log = logging.getLogger(__name__)

CAUSE_MISSING_OUTPUT = "missing output"


@dataclass(frozen=True)
class NodeRules:
    """What this worker node applies to every command: its path map, policy and time cap."""

    path_map: PathMap | None = None
    policy: Policy | None = None
    max_time_limit: float | None = None
    pass_env: tuple[str, ...] = ()
    """Variables the operator passes on to commands (`--pass-env`), beyond the allowlist."""
    ledger: resources.Ledger | None = None
    """This node's memory and slots, shared by its pool processes (resources.py)."""

    @property
    def roots(self) -> tuple[str, ...]:
        return tuple(self.policy.roots) if self.policy is not None else ()


@dataclass(frozen=True)
class Message:
    """A task message as Celery delivered it: the command and the batch's options for it."""

    argv: list[str]
    cwd: str
    options: dict[str, Any]


@dataclass(frozen=True)
class Command:
    """The command as this node runs it (stage 2)."""

    fields: TaskFields
    argv: list[str]
    cwd: str
    env: dict[str, str]
    time_limit: float
    request: resources.Request = resources.Request()

    @property
    def name(self) -> str:
        return label(self.fields.argv)


@dataclass(frozen=True)
class Prepared:
    """The command ready to start in its opened working directory (stage 4)."""

    command: Command
    workdir: WorkDir
    argv: list[str]
    """argv[0] as found (what the command sees)."""
    program: str
    """The file the policy judged: what is executed."""
    marker: DoneMarker | None


@dataclass(frozen=True)
class Run:
    """How the command ran (stage 6), as judged."""

    result: runner.RunResult
    log_error: str | None
    """Why its log files could not be written, if they could not."""


def run_attempt(
    at: Attempt, task: Task, rules: NodeRules, interrupts: Interrupts, message: Message
) -> dict[str, Any]:
    """Run one delivered command, exactly once as far as the records can tell."""
    fields = checked(at, message)
    command = resolved(at, rules, fields)
    with (
        prepared(at, rules, command) as ready,
        resources.admitted(at, rules.ledger, command.request, interrupts.began) as share,
    ):
        claim = claimed(at)
        settled(at, claim, rules, ready)
        run = ran(at, claim, rules, ready, interrupts, share)
    return recorded(at, task, claim, ready, run)


def recorded(at: Attempt, task: Task, claim: Claim, ready: Prepared, run: Run) -> dict[str, Any]:
    """Stage 7: the record of the attempt, written by its lease's owner; Celery is told."""
    record = attempt_record(at, claim, run.result, argv=ready.argv, cwd=ready.command.cwd)
    if run.log_error is not None:
        record["log_error"] = run.log_error
    fields = ready.command.fields
    return outcome(at, task, fields.retries, run.result, record, ready.command.name)


def checked(at: Attempt, message: Message) -> TaskFields:
    """Stage 1: every field of the message, or the command is refused (failed, saying why)."""
    try:
        return check_fields(at.batch_id, at.task_id, message.argv, message.cwd, message.options)
    except RefusedField as exc:
        # a message submit never writes: forged, or from an incompatible version
        log.error("refused a task message: %s", exc)
        if exc.field not in ("batch_id", "command_id"):
            refuse(at, str(exc))
        raise Ignore() from None


def resolved(at: Attempt, rules: NodeRules, fields: TaskFields) -> Command:
    """Stage 2: argv and cwd after this node's path map (the roots bound the result), FSL's
    own tool for an FSL name, the command's environment and its time limit."""
    argv, cwd = list(fields.argv), fields.cwd
    if rules.path_map:
        argv, cwd = rules.path_map.argv(fields.argv), rules.path_map.apply(fields.cwd)
    argv = [local_fsl_tool(argv[0], os.environ), *argv[1:]]
    env = environment.command_env(os.environ, at.batch_id, at.task_id, rules.pass_env)
    env = with_fsl_sub_env(env, fields.job_id, fields.line, fields.job_tasks)
    env = resources.thread_env(env, fields.threads)
    time_limit = fields.time_limit or at.settings.time_limit
    if rules.max_time_limit:
        time_limit = min(time_limit, rules.max_time_limit)
    request = resources.request_of(fields.argv, fields.mem, fields.threads)
    return Command(fields, argv, cwd, env, time_limit, request)


@contextlib.contextmanager
def prepared(at: Attempt, rules: NodeRules, command: Command) -> Iterator[Prepared]:
    """Stage 3: the working directory opened once, below its --root, no symlink followed
    (from here on the worker reads, removes and starts everything in it by this descriptor),
    and the program judged; either fault, once claimed, hands the command back to another
    node."""
    with contextlib.ExitStack() as held:
        try:
            workdir = held.enter_context(opened_workdir(command.cwd, rules.roots))
        except OSError as exc:
            claimed(at)
            hand_back_fault(at, workdir_fault(command.cwd, exc, rules.roots))
        cannot, program = admit(command.argv, workdir.path, command.env, rules.policy)
        if cannot is not None:
            claimed(at)
            hand_back_fault(at, cannot)
        argv = [locate(command.argv[0], workdir.path, command.env) or program, *command.argv[1:]]
        marker = done_marker(argv, workdir.path, command.fields.done_if_exists, workdir.fd)
        yield Prepared(command, workdir, argv, program, marker)


def settled(at: Attempt, claim: Claim, rules: NodeRules, ready: Prepared) -> None:
    """Stage 5: a command whose outputs exist is skipped; one whose marker can't be judged
    safely fails; stale outputs of an earlier attempt are removed, under the renewed lease."""
    if ready.marker is None:
        return
    done, unsafe = judge_done(ready.marker)
    if unsafe is not None:
        why = f"refused: {unsafe}"
        written = record_end(at, FAILED, nothing_ran(at, why, CAUSE_REFUSED, claim), ran=False)
        log_outcome(written, ready.command.name, at)
        raise CommandFailed(why)
    if done:
        skipped = nothing_ran(at, f"already done: {ready.marker.describe()}", claim_=claim)
        record_end(at, SKIPPED, skipped, ran=False)
        raise Ignore()
    go_on_if_still_ours(at, claim.lease, "removing outputs")
    remove_stale(ready.argv, ready.workdir.path, rules.roots, ready.workdir.fd)


def ran(
    at: Attempt,
    claim: Claim,
    rules: NodeRules,
    ready: Prepared,
    interrupts: Interrupts,
    share: resources.Share | None = None,
) -> Run:
    """Stage 6: started while the lease surely holds (its clock started before the claim was
    sent), within START_BUDGET of the delivery, with its output in its log files; then judged
    (a node fault, a stop, missing outputs). A cancel meanwhile is heard at once (a nudge) or
    at the first renewal, and stops it."""
    go_on_if_still_ours(at, claim.lease, "starting")
    if (waited := time.monotonic() - interrupts.began) > START_BUDGET:
        # its own time limit would count from a spawn so late that Celery's hard limit,
        # counted from the delivery, could cut it short: another attempt starts it afresh
        log.warning(
            "command %s of batch %s waited %.0f s to start (over %d s): handed back",
            at.task_id, at.batch_id, waited, START_BUDGET,
        )  # fmt: skip
        hand_back(at)
        raise Ignore()
    if pausing.held():  # delivered as the node paused or its hours ended (owner.py)
        hand_back(at)
        raise Ignore()
    with contextlib.ExitStack() as files:
        outputs, log_error = _log_files(at, claim, rules, ready)
        for opened in outputs or ():
            files.enter_context(opened)
        log.info(
            "batch %s, command %s: running %s (in %s)",
            at.batch_id, at.task_id, shlex.join(ready.argv), ready.command.cwd,
        )  # fmt: skip
        spec = runner.RunSpec(
            ready.argv, ready.workdir.path, env=ready.command.env, executable=ready.program,
            cwd_fd=ready.workdir.fd, timeout=ready.command.time_limit, tag=at.token,
            outputs=outputs,
        )  # fmt: skip
        lease = claim.lease
        watch = runner.Watch(
            on_tick=lease.renew, tick=at.settings.heartbeat, stop=interrupts.stop,
            wake_fd=interrupts.read_fd, lease_until=lambda: lease.valid_until,
            pause=pausing.for_command(START_BUDGET - waited),
            on_sample=share.note_rss if share is not None else None,
        )  # fmt: skip
        with nudges.watching(at.store.r, at.batch_id, interrupts.write_fd):
            result = runner.run_command(spec, watch)
    result = judged(at, claim, ready, result)
    if not result.ok and result.oom_rose and not claim.lease.lapsed():
        result = oom.as_oom(result)  # fsl_reg's missing outputs too: fnirt was the one killed
        record = attempt_record(at, claim, result, argv=ready.argv, cwd=ready.command.cwd)
        oom.hand_back(at, claim, share, result, record)
    return Run(result, log_error)


def _log_files(
    at: Attempt, claim: Claim, rules: NodeRules, ready: Prepared
) -> tuple[tuple[Any, Any] | None, str | None]:
    """The attempt's two output files: fsl_sub's -l logs, or ours, never both. Ours that
    can't be written leave the command running (the record says why); fsl_sub's that can't
    are the node's fault."""
    fields, workdir = ready.command.fields, ready.workdir
    names = fsl_sub_log_names(fields)
    if fields.log_dir is not None and names is not None:
        try:
            return open_logs(workdir.path, fields.log_dir, names, rules.roots, workdir.fd), None
        except (RefusedField, OSError) as exc:
            hand_back_fault(at, fault(CAUSE_REFUSED, f"log files: {exc}", None))
    stem = log_stem(claim.line, claim.number, fields.argv)
    # the real path, as the policy judged it against the --roots (symlinks resolved)
    return open_attempt_logs(workdir.path, at.batch_id, stem, rules.roots, workdir.fd)


def judged(
    at: Attempt, claim: Claim, ready: Prepared, result: runner.RunResult
) -> runner.RunResult:
    """What the run says about the command: a missing program or directory is the node's
    fault; a command killed because its lease lapsed was stopped (the node's fault, counted);
    a stopped command is handed back; fsl_reg's exit 0 holds only if its outputs exist."""
    if result.cause in (runner.CAUSE_NO_CWD, runner.CAUSE_NOT_FOUND):
        missing = ready.command.cwd if result.cause == runner.CAUSE_NO_CWD else ready.argv[0]
        hand_back_fault(at, fault(result.cause, result.message, missing))
    if result.cause in (runner.CAUSE_SIGNAL, runner.CAUSE_STOPPED) and claim.lease.lapsed():
        # this runner could not renew in time (frozen, overloaded, cut off) and it or the
        # guard killed the command: the node's fault, not the command's, perhaps not ours
        result = replace(result, cause=runner.CAUSE_STOPPED, message="stopped: lease ran out")
        count_late(at)
    if result.cause == runner.CAUSE_STOPPED:
        # stopped from outside; its tree is dead. Record nothing
        log.warning(
            "%s (command %s of batch %s) %s",
            ready.command.name, at.task_id, at.batch_id, result.message,
        )  # fmt: skip
        hand_back(at)
        raise Ignore()
    if not result.ok or ready.marker is None:
        return result
    done, unsafe = judge_done(ready.marker)
    if done:
        return result
    # fsl_reg exits 0 even when flirt or fnirt failed: only its outputs tell
    what = unsafe or f"{ready.marker.describe()} is missing or empty"
    return replace(
        result,
        cause=CAUSE_MISSING_OUTPUT,
        message=f"exit code 0 but {what}" + runner.last_line(result.stderr_tail),
    )
