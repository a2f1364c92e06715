"""The Python API: the verbs the CLI calls, usable the same way from a notebook.

from tbss_queue import submit, status
batch = submit("FA/.commands")
status(batch.id).to_dict()
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from .app import make_app
from .batches import FAILED, QUEUED, SKIPPED, BatchStore, TaskSpec, new_batch_id
from .broker import connect
from .commands import parse_commands_file
from .config import Settings
from .errors import BrokerUnavailable, ConfigError
from .fsl import parse_fsl_reg, reg_done
from .models import Batch, BatchStatus, TaskRecord
from .publish import build_messages, task_id_for
from .status import compute

_LIVE = ("queued", "running", "succeeded")


def _store(settings: Settings | None) -> tuple[Settings, BatchStore]:
    settings = settings or Settings.resolve()
    return settings, BatchStore(connect(settings))


def submit(
    path: str | os.PathLike[str],
    *,
    cwd: str | os.PathLike[str] | None = None,
    time_limit: float | None = None,
    settings: Settings | None = None,
) -> Batch:
    """Queue every command of a commands file as one batch; all of them or, on error, none.

    Submitting the same file again (same path and working directory) resumes its batch: only
    commands that are new, failed or cancelled are queued; queued, running and succeeded ones
    are left alone, whatever their order in the file. A command queued, running or succeeded in
    another batch is skipped. Raises CommandsFileError for a bad file before Redis is touched.
    """
    settings = settings or Settings.resolve()
    parsed = parse_commands_file(path)
    workdir = workdir_for(path, cwd)
    if time_limit is not None and not 0 < time_limit < settings.visibility_timeout:
        raise ConfigError(
            f"--time-limit {time_limit:g} s must be positive and below the visibility timeout "
            f"({settings.visibility_timeout} s), or Redis would hand the command out twice"
        )
    settings, store = _store(settings)
    resolved = str(Path(path).resolve())
    file_key = f"{workdir}|{resolved}"
    batch_id = store.batch_for_file(file_key) or new_batch_id()
    keys = [c.key(workdir) for c in parsed.commands]
    ids = [task_id_for(batch_id, k) for k in keys]
    mine = store.states_of(batch_id, ids)
    elsewhere = store.live_tasks(k for k, t in zip(keys, ids, strict=True) if t not in mine)
    changes: list[TaskSpec] = []
    for command, key, tid in zip(parsed.commands, keys, ids, strict=True):
        if mine.get(tid) in _LIVE:
            continue  # resubmission: already queued, running or done in this batch
        state, note = QUEUED, ""
        other = elsewhere.get(key)
        reg = parse_fsl_reg(command.argv)
        if reg is not None and reg_done(reg, workdir):
            state, note = SKIPPED, f"outputs exist ({reg.output}_warp.msf)"
        elif other and other[0] != batch_id and other[2] in _LIVE:
            state, note = SKIPPED, f"already {other[2]} in batch {other[0]}"
        changes.append(TaskSpec(tid, command.line, command.argv, key, state, note))
    to_queue = [s for s in changes if s.state == QUEUED]
    options = {"time_limit": time_limit} if time_limit else {}
    messages = build_messages(make_app(settings), batch_id, workdir, to_queue, options)
    now = time.time()
    meta: dict[str, Any] = {
        "id": batch_id,
        "path": resolved,
        "cwd": workdir,
        "time_limit": time_limit,
        "last_submitted": now,
    }
    if not mine:
        meta["submitted"] = now
    try:
        queue = store.stage(batch_id, meta, changes, messages)
        store.commit(batch_id, queue, len(messages), file_key)
    except BaseException:
        store.discard(batch_id)
        raise
    warnings = tuple(
        f"{parsed.path}:{line}: duplicate of line {first}, queued once"
        for line, first in parsed.duplicates
    )
    return Batch(
        batch_id,
        resolved,
        workdir,
        now,
        len(parsed.commands),
        len(to_queue),
        len(parsed.commands) - len(to_queue),
        warnings,
    )


def workdir_for(path: str | os.PathLike[str], cwd: str | os.PathLike[str] | None) -> str:
    """The directory commands run in: --cwd, else the one holding the file (FA/ for TBSS)."""
    chosen = Path(cwd) if cwd is not None else Path(path).resolve().parent
    if not chosen.is_dir():
        raise ConfigError(f"--cwd: {chosen} is not a directory")
    return str(chosen.resolve())


def status(batch_id: str | None = None, *, settings: Settings | None = None) -> BatchStatus:
    """Counts, throughput and ETA of a batch (default: the latest). Constant cost in batch size."""
    _, store = _store(settings)
    bid = store.resolve_id(batch_id)
    return compute(bid, store.snapshot(bid))


def list_batches(*, settings: Settings | None = None) -> list[BatchStatus]:
    """Every batch on the broker, oldest first, with its counts."""
    _, store = _store(settings)
    return [compute(b, store.snapshot(b)) for b in store.batch_ids()]


def tasks(
    batch_id: str | None = None, *, state: str | None = None, settings: Settings | None = None
) -> list[TaskRecord]:
    """The commands of a batch in file order, with state and last attempt (reads every task)."""
    _, store = _store(settings)
    bid = store.resolve_id(batch_id)
    specs, states = store.task_specs(bid), store.states(bid)
    wanted = [t for t in specs if state is None or states.get(t) == state]
    results = store.results(bid, wanted)
    out = []
    for tid in wanted:
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
            )
        )
    return sorted(out, key=lambda r: r.line)


def failures(batch_id: str | None = None, *, settings: Settings | None = None) -> list[TaskRecord]:
    """The failed commands of a batch, with cause, exit code, node and stderr tail."""
    return tasks(batch_id, state=FAILED, settings=settings)


def wait(
    batch_id: str | None = None,
    *,
    settings: Settings | None = None,
    poll: float = 1.0,
    on_update: Callable[[BatchStatus], None] | None = None,
    timeout: float | None = None,
) -> BatchStatus:
    """Block until the batch has nothing queued or running; returns its final status."""
    settings = settings or Settings.resolve()
    bid = BatchStore(connect(settings)).resolve_id(batch_id)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        current = _poll_status(bid, settings)
        if on_update is not None:
            on_update(current)
        if current.done:
            return current
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"batch {bid} not done after {timeout} s")
        time.sleep(poll)


def _poll_status(batch_id: str, settings: Settings) -> BatchStatus:
    """Status that rides out a broker restart: keep asking until Redis answers again."""
    while True:
        try:
            return status(batch_id, settings=settings)
        except (BrokerUnavailable, redis.ConnectionError, redis.TimeoutError):
            time.sleep(1.0)
