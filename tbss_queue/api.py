"""The Python API: the verbs the CLI calls, usable the same way from a notebook.

from tbss_queue import submit, status
batch = submit("FA/.commands")
status(batch.id).to_dict()
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import redis

from tbss_queue.commands import Command, ParsedFile, parse_commands_file
from tbss_queue.config import Settings
from tbss_queue.errors import BatchBusy, BatchNotFound, BrokerUnavailable, ConfigError, LogNotFound
from tbss_queue.execution.done import DoneMarker, done_marker, judge_done
from tbss_queue.execution.logs import batch_log_dir, log_stem
from tbss_queue.fsl.matrix import MAX_CELLS, SubjectMatrix, subject_matrix
from tbss_queue.models import Batch, BatchStatus, NodeInfo, TaskRecord
from tbss_queue.paths import PathMap
from tbss_queue.queue.app import make_app
from tbss_queue.queue.batches import BatchStore
from tbss_queue.queue.broker import broker_full, connect, replicated
from tbss_queue.queue.keys import (
    CANCELLED,
    CHUNK,
    FAILED,
    NODES,
    QUEUED,
    SKIPPED,
    SUCCEEDED,
    Staging,
    TaskSpec,
    batch_key,
    new_batch_id,
    new_submission_id,
    run_line,
    task_id_for,
)
from tbss_queue.queue.persistence import (
    lost_or_not_found,
    persistence_warning,
    remember,
    server_run_id,
)
from tbss_queue.queue.publish import (
    HARD_LIMIT_MARGIN,
    build_messages,
    label,
    send_options,
    task_kwargs,
)
from tbss_queue.views import requests
from tbss_queue.views.logfiles import (
    CommandLog,
    attempt_outcome,
    find_commands,
    fsl_sub_paths,
    latest_batch_in,
    parse_ref,
    recorded_ends,
    write_joblog,
)
from tbss_queue.views.status import compute, fsl_version_warning

_LIVE = ("queued", "running", "succeeded")
_OPTIONS = ("time_limit", "retries", "done_if_exists", "log_dir", "job_name", "job_id", "job_tasks")


def _store(settings: Settings | None) -> tuple[Settings, BatchStore]:
    settings = settings or Settings.resolve()
    return settings, BatchStore(connect(settings))


def submit(
    path: str | os.PathLike[str],
    *,
    cwd: str | os.PathLike[str] | None = None,
    time_limit: float | None = None,
    retries: int = 0,
    done_if_exists: str | None = None,
    path_map: PathMap | None = None,
    after: Sequence[str] = (),
    log_dir: str | None = None,
    job_name: str | None = None,
    job_id: int | None = None,
    job_tasks: int | None = None,
    mem: int | None = None,
    threads: int | None = None,
    settings: Settings | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    request_names: tuple[str, str] = ("--mem", "--threads"),
) -> Batch:
    """Queue every command of a commands file as one batch; all of them or, on error, none.

    `on_progress(staged, total)` is called as the file is staged, a chunk at a time.

    Submitting the same file again (same path and working directory) resumes its batch: only
    commands that are new, failed or cancelled are queued; queued, running and succeeded ones
    are left alone, whatever their order in the file, except a succeeded one whose outputs are
    gone (fsl_reg's, or `done_if_exists`): it is queued again, and a warning says how many.
    With `after` (batch ids), nothing runs until those batches have ended (fsl_sub's -j hold).
    Commands whose outputs exist (fsl_reg's .msf and warp, or `done_if_exists`), or that are
    queued, running or succeeded in another batch, are skipped.
    `mem` (bytes) and `threads` are what each command asks of a node (resources.py); a request
    larger than every worker node that ever joined is refused (ConfigError naming
    `request_names`), nothing queued.
    Raises CommandsFileError for a bad file before Redis is touched.
    """
    settings = settings or Settings.resolve()
    parsed = parse_commands_file(path)
    local_workdir = workdir = workdir_for(path, cwd)
    _check_time_limit(time_limit, settings)
    if path_map:  # what the workers will see; done checks use this machine's paths
        workdir = path_map.apply(workdir)
    settings, store = _store(settings)
    remember(store.r)  # before any commit: no batch without the dataset's epoch mark
    resolved = str(Path(path).resolve())
    after = [store.resolve_id(b) for b in after]  # unknown ids fail before anything is staged
    if refused := requests.refusal(mem, threads, store.all_node_facts(), request_names):
        raise ConfigError(refused)
    options = {
        "path": resolved,
        "cwd": workdir,
        "submit_cwd": local_workdir,  # where `logs` finds the log files the workers wrote
        "time_limit": time_limit or settings.time_limit,  # one per batch, in its messages
        "retries": retries,
        "done_if_exists": done_if_exists,
        "log_dir": log_dir,
        "job_name": job_name,
        # fsl_sub's job id and array size (fsl_sub_plugin_tbss_queue): log names, FSLSUB_* vars
        "job_id": job_id,
        "job_tasks": job_tasks,
        "mem": mem,  # what each command asks of a node (resources.py)
        "threads": threads,
    }
    planner = _Planner(store, parsed, local_workdir, workdir, path_map, done_if_exists, on_progress)
    batch_id, now, queued, warning = _commit_file(store, settings, options, planner, after)
    with contextlib.suppress(redis.RedisError):
        replicated(store.r, settings)  # a batch a replica holds survives a failover
    tally = planner.tally
    return Batch(
        batch_id,
        resolved,
        workdir,
        now,
        parsed.count,
        queued,
        tally[SKIPPED] + max(0, tally["changed"] - tally[SKIPPED] - queued),
        _submit_warnings(store, parsed, warning, planner.redone),
        unchanged=parsed.count - tally["changed"],
    )


@dataclass
class _Planner:
    """What a submission changes in a batch, a chunk of the file at a time; counts of the
    last plan (an attempt to commit that lost to another submit of the file plans again)."""

    store: BatchStore
    parsed: ParsedFile
    local_workdir: str
    workdir: str
    path_map: PathMap | None
    done_if_exists: str | None
    on_progress: Callable[[int, int], None] | None
    tally: Counter[str] = field(default_factory=Counter)
    redone: list[int] = field(default_factory=list)
    """Lines of succeeded commands whose outputs are gone, queued again."""

    def plan(self, batch_id: str) -> Iterator[list[TaskSpec]]:
        """The changes to batch `batch_id`, a chunk of the file at a time."""
        self.tally.clear()
        self.redone.clear()
        for chunk in self.parsed.chunks(CHUNK):
            markers = [done_marker(c.argv, self.local_workdir, self.done_if_exists) for c in chunk]
            if self.path_map:
                chunk = [replace(c, argv=tuple(self.path_map.argv(c.argv))) for c in chunk]
            keys = [c.key(self.workdir) for c in chunk]
            changes = _plan(self.store, batch_id, chunk, keys, markers)
            self.tally.update(
                read=len(chunk),
                changed=len(changes),
                skipped=sum(c.state == SKIPPED for c in changes),
            )
            self.redone.extend(c.line for c in changes if c.expect == SUCCEEDED)
            yield changes
            if self.on_progress is not None:
                self.on_progress(self.tally["read"], self.parsed.count)


def _commit_file(
    store: BatchStore,
    settings: Settings,
    options: dict[str, Any],
    planner: _Planner,
    after: Sequence[str],
) -> tuple[str, float, int, str | None]:
    """Commit the file's batch: a new one, or its earlier batch merged; planned again when
    another submit of the same file commits first. Its id, time, commands queued, warning."""
    file_key = f"{options['cwd']}|{options['path']}"
    for _ in range(10):
        owner = store.batch_for_file(file_key)
        batch_id = owner or new_batch_id()
        now = time.time()
        meta: dict[str, Any] = {"id": batch_id, **options, "last_submitted": now}
        meta["keep"] = settings.keep  # how long its records stay once it ends (ending.lua)
        if owner is None:
            meta["submitted"] = now
        queued, warning = _enqueue(
            store, settings, batch_id, meta, planner.plan(batch_id), file_key, after,
            owner or "", merge=owner is not None,
        )  # fmt: skip
        if queued >= 0:
            return batch_id, now, queued, warning
    raise BrokerUnavailable(
        f"{options['path']}: other submissions of this file keep committing first"
    )


def _submit_warnings(
    store: BatchStore, parsed: ParsedFile, warning: str | None, redone: Sequence[int]
) -> tuple[str, ...]:
    """What a submit says beside the batch: duplicate lines, the commit's own warning,
    succeeded commands queued again, a Redis that does not persist."""
    warnings = tuple(
        f"{parsed.path}:{line}: duplicate of line {first}, queued once"
        for line, first in parsed.duplicates
    )
    if warning:
        warnings += (warning,)
    if redone:
        warnings += (redone_line(redone),)
    with contextlib.suppress(redis.RedisError):  # the batch is committed: report it anyway
        if persisted := persistence_warning(store.r):
            warnings += (persisted,)
    return warnings


def redone_line(lines: Sequence[int], shown: int = 10) -> str:
    """What a resubmit says of succeeded commands it queued again: how many, why, which."""
    some = ", ".join(str(n) for n in lines[:shown]) + (", …" if len(lines) > shown else "")
    which = f"line {some}" if len(lines) == 1 else f"lines {some}"
    why = "its output is gone" if len(lines) == 1 else "their outputs are gone"
    return f"{len(lines):,} queued again: {why} ({which})"


def _plan(
    store: BatchStore,
    batch_id: str,
    commands: Sequence[Command],
    keys: Sequence[str],
    markers: Sequence[DoneMarker | None],
) -> list[TaskSpec]:
    """What a submission changes in batch `batch_id` (new or existing), for some commands.

    A command already queued, running or done in this batch is left alone, unless it succeeded
    and its outputs (its marker) are gone: success is judged by outputs, so it is queued again.
    One whose outputs exist, or that is live in another batch, is skipped; the rest are queued.
    Each change carries the state it was planned against, which the commit checks
    (lua/apply.lua): a succeeded command queued again is changed only if still 'succeeded'."""
    ids = [task_id_for(batch_id, k) for k in keys]
    mine = store.states_of(batch_id, ids)
    elsewhere = store.live_tasks(k for k, t in zip(keys, ids, strict=True) if t not in mine)
    changes: list[TaskSpec] = []
    for command, key, tid, marker in zip(commands, keys, ids, markers, strict=True):
        if mine.get(tid) == SUCCEEDED and _outputs_gone(marker):
            changes.append(TaskSpec(tid, command.line, command.argv, key, QUEUED, expect=SUCCEEDED))
            continue
        if mine.get(tid) in _LIVE:
            continue  # resubmission: already queued, running or done in this batch
        state, note = QUEUED, ""
        other = elsewhere.get(key)
        if marker is not None and marker.done():
            state, note = SKIPPED, f"already done: {marker.describe()}"
        elif other and other[0] != batch_id and other[2] in _LIVE:
            state, note = SKIPPED, f"already {other[2]} in batch {other[0]}"
        expect = mine.get(tid, "")
        changes.append(TaskSpec(tid, command.line, command.argv, key, state, note, expect=expect))
    return changes


def _outputs_gone(marker: DoneMarker | None) -> bool:
    """A command that tells its outputs (fsl_reg, --done-if-exists) and whose outputs are not
    there; one that can't be judged (a FIFO where its .msf should be) is left as it was."""
    done, unjudged = judge_done(marker)
    return marker is not None and not done and unjudged is None


def _check_time_limit(time_limit: float | None, settings: Settings) -> None:
    if time_limit is not None and not (
        0 < time_limit and time_limit + HARD_LIMIT_MARGIN < settings.visibility_timeout
    ):
        raise ConfigError(
            f"--time-limit {time_limit:g} s must be positive and below the visibility timeout "
            f"({settings.visibility_timeout} s) by {HARD_LIMIT_MARGIN} s, or Redis would hand "
            "the command to a second worker while it still runs"
        )


def _enqueue(
    store: BatchStore,
    settings: Settings,
    batch_id: str,
    meta: dict[str, Any],
    parts: Iterable[list[TaskSpec]],
    file_key: str,
    after: Sequence[str] = (),
    file_owner: str = "*",
    *,
    merge: bool,
) -> tuple[int, str | None]:
    """Stage the changes (and their messages) a part at a time, commit them in one
    constant-time step, then apply them in bounded steps; returns how many commands were
    queued (-1 when another submit of the same file committed first: nothing of this one is
    visible then), and a warning if the broker failed after the commit. On any error before
    the commit nothing is visible and the staging is removed; after it, the submission is
    applied whole (by a worker's reaper if this process dies). Only one part is held in
    memory at a time."""
    app = make_app(settings)
    kwargs, options = task_kwargs(meta), send_options(settings.time_limit, meta)
    mode = "merge" if merge else "new"
    sid, queue, n_messages, n_parts = new_submission_id(), None, 0, 0
    try:
        store.stage_meta(batch_id, sid, meta)
        for changes in parts:
            to_queue = [c for c in changes if c.state == QUEUED]
            messages = build_messages(app, batch_id, meta["cwd"], to_queue, kwargs, options)
            if settings.signing:  # the records keep each command's signed message
                signed = {t.task_id: m for t, (_, m) in zip(to_queue, messages, strict=True)}
                changes = [replace(c, message=signed.get(c.task_id, "")) for c in changes]
            queue = queue or (messages[0][0] if messages else None)
            n_parts += 1
            store.stage_part(Staging(batch_id, sid, mode, n_parts, queue, 0), changes, messages)
            n_messages += len(messages)
        staging = Staging(batch_id, sid, mode, n_parts, queue, n_messages)
        if after:
            store.hold(staging, file_key, after)
            return n_messages, None
        committed = store.commit(staging, file_key, file_owner=file_owner)
    except BaseException as exc:
        # staged keys expire on their own if Redis can't be told now; the first error counts
        with contextlib.suppress(redis.RedisError):
            staged = Staging(batch_id, sid, "merge", n_parts + 1, queue, n_messages)
            store.discard(staged)
        if isinstance(exc, redis.exceptions.OutOfMemoryError):
            raise broker_full(store.r) from None
        raise
    if committed < 0:
        store.discard(staging)
        if committed == -3:  # an earlier submission of this batch is half applied: finish it
            store.apply(batch_id)
        return -1, None
    try:
        elsewhere = store.apply(batch_id)
    except redis.RedisError as exc:
        # committed: the batch is whole and will be queued whole, by the workers' reapers;
        # the user gets its id, not a broker error
        return n_messages, (
            f"the broker failed while this batch was being queued ({type(exc).__name__}: {exc}); "
            "it is committed whole, and the workers queue the rest"
        )
    if elsewhere:
        # another submission (of another file with the same lines) committed them first:
        # decided in the step that wrote the command index, so each runs once
        return n_messages - elsewhere, (
            f"{elsewhere} command(s) were queued by another submission meanwhile: skipped here "
            "(see `status`)"
        )
    return n_messages, None


def retry(batch_id: str | None = None, *, settings: Settings | None = None) -> Batch:
    """Queue the failed and cancelled commands of a batch again, exactly those."""
    settings, store = _store(settings)
    bid = store.resolve_id(batch_id)
    store.apply(bid)  # a submission still being applied first: it may requeue some of them
    meta = store.meta(bid)
    states = store.states(bid)
    again = [t for t, s in states.items() if s in (FAILED, CANCELLED)]
    specs = store.task_specs(bid, again)
    changes = [
        TaskSpec(t, specs[t]["line"], tuple(specs[t]["argv"]), "", expect=states[t]) for t in again
    ]
    queued, warning = _enqueue(
        store,
        settings,
        bid,
        {"last_submitted": time.time(), "cwd": meta["cwd"], **{k: meta.get(k) for k in _OPTIONS}},
        (changes[i : i + CHUNK] for i in range(0, len(changes), CHUNK)),
        f"{meta['cwd']}|{meta['path']}",
        merge=True,
    )
    warnings = (warning,) if warning else ()
    return Batch(bid, meta["path"], meta["cwd"], time.time(), queued, queued, 0, warnings)


def cancel(batch_id: str, *, settings: Settings | None = None) -> BatchStatus:
    """Drop a batch's queued commands and kill its running ones with their whole process tree.

    The batch must be named (an id or a unique prefix): there is no "latest" default for
    something that kills running commands.

    Nothing is revoked: the records say `cancelled`; a running command's runner, nudged to
    renew its lease at once (or at its next renewal, if the nudge is missed), sees it and kills
    the command's tree; a queued message is dropped by the claim. `retry` then queues every
    cancelled command again.
    """
    if not batch_id:
        raise ConfigError("cancel: name the batch (see `tbss-queue batches`)")
    settings, store = _store(settings)
    if hold := store.held().get(batch_id):  # held (fsl_sub's -j): it comes to be, cancelled
        after = ", ".join(hold["after"])
        store.release(batch_id, cancel=f"cancelled while held until batch(es) {after} ended")
    bid = store.resolve_id(batch_id)
    store.cancel(bid)
    return status(bid, settings=settings)


def held_until(batch_id: str, *, settings: Settings | None = None) -> tuple[str, ...] | None:
    """The batches a held submission (submit --after, fsl_sub's -j) waits for, or None if
    `batch_id` (a full id) is not held."""
    _, store = _store(settings)
    hold = store.held().get(batch_id)
    return tuple(hold["after"]) if hold else None


def forget(batch_id: str, *, settings: Settings | None = None) -> int:
    """Drop every record of an ended batch now, instead of at the end of its retention time
    (TBSS_QUEUE_KEEP). Its outputs stay, so a resubmission still skips done fsl_reg pairs.
    Returns the number of Redis keys removed, once no runner holds a command of it any more;
    BatchBusy while something is queued or running."""
    settings, store = _store(settings)
    bid = store.resolve_id(batch_id)
    store.apply(bid)
    counts = store.snapshot(bid)["counts"]
    busy = counts.get(QUEUED, 0) + counts.get("running", 0)
    if busy:
        raise BatchBusy(
            f"batch {bid} has {busy} command(s) queued or running: "
            f"cancel it first (tbss-queue cancel {bid})"
        )
    # a cancelled command may still be stopping: its runner lets go within a heartbeat or two
    # (or its lease lapses and a reaper lets go for it); forget returns once none holds one
    deadline = time.monotonic() + settings.lost_after + 2 * settings.heartbeat
    while store.holders(bid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return store.forget(bid)


def workdir_for(path: str | os.PathLike[str], cwd: str | os.PathLike[str] | None) -> str:
    """The directory commands run in: --cwd, else the one holding the file (FA/ for TBSS)."""
    chosen = Path(cwd) if cwd is not None else Path(path).resolve().parent
    if not chosen.is_dir():
        raise ConfigError(f"--cwd: {chosen} is not a directory")
    return str(chosen.resolve())


def status(batch_id: str | None = None, *, settings: Settings | None = None) -> BatchStatus:
    """Counts, throughput and ETA of a batch (default: the latest), node health, requeues.

    Constant cost in batch size. An ended batch's rates and times are those at its end."""
    settings, store = _store(settings)
    try:
        bid = store.resolve_id(batch_id)
    except BatchNotFound as exc:
        if batch_id is None:
            raise
        raise lost_or_not_found(store.r, batch_id, None, exc) from None
    snap = store.snapshot(bid)
    fleet = store.fleet(settings.lost_after, snap["now"])
    current = compute(bid, snap, fleet)
    facts = store.node_facts([n.node for n in current.nodes])
    said: tuple[Any, ...] = (snap["meta"].get("dependency"), fsl_version_warning(facts))
    if current.queued and (cannot := requests.unplaceable(snap["meta"], facts, fleet.online())):
        said += (f"{current.queued} queued: {cannot}",)
    warnings = tuple(str(w) for w in said if w)
    return replace(current, warnings=warnings) if warnings else current


def nodes(*, settings: Settings | None = None) -> list[NodeInfo]:
    """Every worker node that ever announced itself: its health (online, stopping, stopped,
    lost, quarantined), and the commands it runs now, by their labels."""
    settings, store = _store(settings)
    fleet = store.fleet(settings.lost_after)
    names = sorted(set(store.r.hkeys(NODES)) | set(fleet.heartbeats) | set(fleet.stopping))
    facts = store.node_facts(names)
    running: dict[str, list[str]] = {}
    by_batch: dict[str, list[tuple[str, str]]] = {}
    for member_, record in store.running().items():
        batch_id, task_id = member_.split("|", 1)
        by_batch.setdefault(batch_id, []).append((task_id, record["node"]))
    for batch_id, pairs in by_batch.items():
        specs = store.task_specs(batch_id, [t for t, _ in pairs])
        for task_id, node in pairs:
            argv = specs.get(task_id, {}).get("argv")
            running.setdefault(node, []).append(label(argv) if argv else task_id)
    return [
        NodeInfo(
            node=n,
            online=n in fleet.online(),
            last_seen=fleet.heartbeats.get(n),
            quarantined=fleet.quarantine.get(n),
            cannot=fleet.faults.get(n, ()),
            paused=fleet.paused.get(n),
            facts=facts.get(n, {}),
            state=fleet.state(n, len(running.get(n, ()))),
            heartbeat_age=fleet.heartbeat_age(n),
            running=tuple(sorted(running.get(n, ()))),
        )
        for n in names
    ]


def autoalloc_state(*, settings: Settings | None = None) -> dict[str, str]:
    """What `tbss-queue autoalloc` last saw and did (empty if none ever ran on this broker)."""
    from tbss_queue.autoalloc import read_state

    _, store = _store(settings)
    return read_state(store.r)


def resume_node(node: str, *, settings: Settings | None = None) -> bool:
    """Let a quarantined node take commands again (it does within one heartbeat); False if it
    was not quarantined. Give the full name (name@host), as `nodes` lists it."""
    _, store = _store(settings)
    return store.release_node(node)


def list_batches(*, settings: Settings | None = None) -> list[BatchStatus]:
    """Every batch on the broker, oldest first, with its counts."""
    settings, store = _store(settings)
    fleet = store.fleet(settings.lost_after)
    return [compute(b, store.snapshot(b), fleet) for b in store.batch_ids()]


def tasks(
    batch_id: str | None = None, *, state: str | None = None, settings: Settings | None = None
) -> list[TaskRecord]:
    """The commands of a batch in file order, with state and last attempt (reads every task)."""
    _, store = _store(settings)
    bid = store.resolve_id(batch_id)
    specs, states = store.task_specs(bid), store.states(bid)
    wanted = [t for t in specs if state is None or states.get(t) == state]
    return _records(store, bid, specs, states, store.results(bid, wanted), wanted)


def _ran(store: BatchStore, batch_id: str) -> list[TaskRecord]:
    """The commands of a batch that have a record of an attempt (every failed one has): read
    from those records, so the cost grows with what ran, not with the batch."""
    results = store.results(batch_id)
    ids = list(results)
    specs, states = store.task_specs(batch_id, ids), store.states_of(batch_id, ids)
    return _records(store, batch_id, specs, states, results, ids)


def _records(
    store: BatchStore,
    batch_id: str,
    specs: dict[str, dict[str, Any]],
    states: dict[str, str],
    results: dict[str, dict[str, Any]],
    ids: Sequence[str],
) -> list[TaskRecord]:
    meta_cwd = store.meta(batch_id).get("cwd")
    out = []
    for tid in ids:
        spec, res = specs[tid], results.get(tid, {})
        out.append(
            TaskRecord(
                task_id=tid,
                line=spec["line"],
                argv=tuple(spec["argv"]),
                state=states.get(tid, "?"),
                cause=res.get("cause"),
                exit_code=res.get("exit_code"),
                node=res.get("node"),
                duration=res.get("duration"),
                stderr_tail=res.get("stderr_tail", ""),
                message=res.get("message") or spec.get("note", ""),
                started=res.get("started"),
                ended=res.get("ended"),
                slot=res.get("slot"),
                attempt=res.get("attempt"),
                ran=tuple(res["argv"]) if res.get("argv") else None,
                ran_cwd=res.get("cwd") if res.get("cwd") != meta_cwd else None,
                peak_rss=res.get("peak_rss"),
            )
        )
    return sorted(out, key=lambda r: r.line)


def failures(batch_id: str | None = None, *, settings: Settings | None = None) -> list[TaskRecord]:
    """The failed commands of a batch, with cause, exit code, node and stderr tail."""
    _, store = _store(settings)
    return _failed(store, store.resolve_id(batch_id))


def _failed(store: BatchStore, batch_id: str) -> list[TaskRecord]:
    """Read from the batch's set of failed commands: the cost grows with the failures."""
    ids = store.failed_ids(batch_id)
    if not ids and int(store.r.hget(batch_key(batch_id, "counts"), FAILED) or 0):
        # failed before the set existed (an upgrade mid-study): read every record once
        return [r for r in _ran(store, batch_id) if r.state == FAILED]
    specs, states = store.task_specs(batch_id, ids), store.states_of(batch_id, ids)
    failed = [t for t in ids if states.get(t) == FAILED and t in specs]
    return _records(store, batch_id, specs, states, store.results(batch_id, failed), failed)


def matrix(
    batch_id: str | None = None, *, settings: Settings | None = None
) -> SubjectMatrix | None:
    """The subject matrix of a `tbss_2_reg -n` batch (every fsl_reg pair with its state and
    .msf cost, failures per subject, the broken subjects named); None for any other batch."""
    _, store = _store(settings)
    return _matrix(store, status(batch_id, settings=settings))


def _matrix(store: BatchStore, current: BatchStatus) -> SubjectMatrix | None:
    """Reads every command of the batch: only for batches of at most MAX_CELLS."""
    if current.total > MAX_CELLS:
        return None
    bid = current.batch
    specs, states = store.task_specs(bid), store.states(bid)
    records = _records(store, bid, specs, states, store.results(bid), list(specs))
    return subject_matrix(records, current.cwd)


def report(
    batch_id: str | None = None,
    *,
    path: str | os.PathLike[str] | None = None,
    settings: Settings | None = None,
    timeline: bool = True,
) -> dict[str, Any]:
    """A batch's summary, timeline (node, slot, start, end of every recorded attempt) and
    failures; with `path`, also written there as a self-contained HTML report with plots.
    Reads the batch's run log and its failed commands, not every command's record.
    `timeline=False`: None in its place (a second saved per million attempts, when only the
    HTML is wanted)."""
    from tbss_queue.views.report import (  # matplotlib: loaded only for reports
        Runs,
        render_html,
        report_data,
    )

    current = status(batch_id, settings=settings)
    store = _store(settings)[1]
    lines = store.runs(current.batch)
    if not lines and current.succeeded + current.failed:  # recorded before the run log existed
        lines = [
            f"{run_line(asdict(r))}\t{r.state}"
            for r in _ran(store, current.batch)
            if r.started is not None and r.ended is not None
        ]
    runs = Runs.parse(lines)
    failed = _failed(store, current.batch)
    subjects = _matrix(store, current)
    data = report_data(current, runs, failed, subjects, timeline=timeline)
    if path is not None:
        html = render_html(current, runs, failed, subjects, data)
        Path(path).write_text(html, encoding="utf-8")
    return data


def write_commands(records: list[TaskRecord], path: str | os.PathLike[str]) -> None:
    """Write commands as a commands file (one normalized line each), e.g. to fix and resubmit."""
    Path(path).write_text("".join(r.text + "\n" for r in records))


def wait(
    batch_id: str | None = None,
    *,
    settings: Settings | None = None,
    poll: float = 1.0,
    on_update: Callable[[BatchStatus], None] | None = None,
    timeout: float | None = None,
    on_outage: Callable[[float | None], None] | None = None,
) -> BatchStatus:
    """Block until the batch has nothing queued or running; returns its final status.

    A broker outage is ridden out: `on_outage` hears when it began (a Unix time) and, with
    None, that the broker answers again, so that a watcher can say so and carry on."""
    settings = settings or Settings.resolve()
    client = connect(settings)
    bid = BatchStore(client).resolve_id(batch_id)
    known = server_run_id(client)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            current = status_riding_out(bid, settings=settings, on_outage=on_outage)
        except BatchNotFound as exc:  # gone while we waited: lost in a restart?
            raise lost_or_not_found(client, bid, known, exc) from None
        if on_update is not None:
            on_update(current)
        if current.done:
            return current
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"batch {bid} not done after {timeout} s")
        time.sleep(poll)


BROKER_DOWN = (BrokerUnavailable, redis.ConnectionError, redis.TimeoutError)
"""What a call raises while the broker is out (stopped, restarting, out of reach)."""


def status_riding_out(
    batch_id: str | None = None,
    *,
    settings: Settings | None = None,
    on_outage: Callable[[float | None], None] | None = None,
    retry_every: float = 1.0,
) -> BatchStatus:
    """`status` that rides out a broker outage: keep asking until Redis answers again.
    `on_outage(since)` is told once when the outage begins, `on_outage(None)` once it ends."""
    since: float | None = None
    while True:
        try:
            current = status(batch_id, settings=settings)
        except BROKER_DOWN:
            if since is None:
                since = time.time()
                if on_outage is not None:
                    on_outage(since)
            time.sleep(retry_every)
            continue
        if since is not None and on_outage is not None:
            on_outage(None)
        return current


def logs(
    batch_id: str | None,
    command: int | str,
    *,
    attempt: int | None = None,
    settings: Settings | None = None,
    study: str | os.PathLike[str] | None = None,
) -> CommandLog:
    """Where one attempt (default: the last) of one command left its stdout and stderr, and
    how that attempt ended.

    `command` is a line of the commands file or an fsl_reg pair (`sub05→sub01`, `sub05,sub01`,
    `sub05_FA_to_sub01_FA`). With no `batch_id`: the latest batch of the study at `study`
    (default: the working directory), as a user standing in it means.
    Raises ConfigError when it names no command, or several, or an attempt that never was;
    LogNotFound when the command has not started yet. The files may still be missing (a node
    that could not write them, a study mounted elsewhere): `missing` says why, and the
    record's tails are there for the last attempt.
    """
    _, store = _store(settings)
    ref = parse_ref(command)
    if batch_id is None:
        bid = latest_batch_in(store, os.getcwd() if study is None else study)
    else:
        bid = store.resolve_id(batch_id)
    what = f"line {ref}" if isinstance(ref, int) else f"pair {ref[0]}→{ref[1]}"
    # a chunk of the batch's commands at a time: a million need not be held to find one
    specs = store.r.hscan_iter(batch_key(bid, "cmd"), count=CHUNK)
    found = find_commands(((t, json.loads(v)) for t, v in specs), ref)
    if not found:
        raise ConfigError(f"batch {bid} has no command at {what}")
    if len(found) > 1:
        lines = ", ".join(str(s["line"]) for _, s in sorted(found, key=lambda f: f[1]["line"]))
        raise ConfigError(f"{what} names {len(found)} commands of batch {bid} (lines {lines})")
    [(tid, spec)] = found
    argv, line = tuple(spec["argv"]), int(spec["line"])
    attempts = int(store.r.hget(batch_key(bid, "attempts"), tid) or 0)
    state = store.states_of(bid, [tid]).get(tid, "?")
    if attempts == 0:
        raise LogNotFound(f"batch {bid}, {what}: not started yet ({state}), no output")
    n = attempts if attempt is None else attempt
    if not 1 <= n <= attempts:
        raise ConfigError(f"batch {bid}, {what}: --attempt {n}: there were {attempts} attempt(s)")
    meta = store.meta(bid)
    where = str(meta.get("submit_cwd") or meta["cwd"])
    record = store.results(bid, [tid]).get(tid, {})
    last = record if record.get("attempt") == n else {}
    paths = fsl_sub_paths(meta, bid, tid, line, argv, where)
    if paths is not None and n != attempts:
        raise ConfigError(
            f"batch {bid}, {what}: fsl_sub's logs (-l) keep the last attempt only ({attempts})"
        )
    if paths is None:
        stem = os.path.join(where, batch_log_dir(bid), log_stem(line, n, argv))
        paths = (f"{stem}.out", f"{stem}.err")
    missing = last.get("log_error")
    if missing is None and not (os.path.exists(paths[0]) and os.path.exists(paths[1])):
        node = f" by {last['node']}" if last.get("node") else ""
        missing = (
            f"{paths[0]} and .err not found here (written{node} in the batch's directory "
            f"{meta['cwd']}: is it mounted at {where} on this machine?)"
        )
    # the last attempt's own record tells its end; an earlier one's is in the run log, read
    # whole (a second at a million attempts): only for those
    told = n == attempts and (bool(last) or state == "running")
    ends = [] if told else recorded_ends(store, bid, line)
    outcome, ran_on = attempt_outcome(n, attempts, state, last, ends)
    return CommandLog(
        batch=bid,
        task_id=tid,
        line=line,
        command=shlex.join(argv),
        label=label(argv),
        state=state,
        attempt=n,
        attempts=attempts,
        stdout=paths[0],
        stderr=paths[1],
        node=ran_on or last.get("node"),
        missing=missing,
        outcome=outcome,
        stdout_tail=last.get("stdout_tail", ""),
        stderr_tail=last.get("stderr_tail", ""),
    )


def joblog(
    batch_id: str | None, path: str | os.PathLike[str], *, settings: Settings | None = None
) -> int:
    """Write a GNU parallel `--joblog` of a batch (one line per command that ran, its last
    attempt) to `path`, for tools that read one; returns the number of lines below the header."""
    _, store = _store(settings)
    return write_joblog(_ran(store, store.resolve_id(batch_id)), path)
