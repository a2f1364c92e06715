"""Elastic pilots: a manager that keeps enough Slurm pilot jobs pending or running for the
queued commands, per partition, and none while nothing waits.

`decide` is the policy, a pure function; `Manager` is the loop that reads the queue from Redis
and Slurm's view from `squeue` (and `sacct` or `scontrol` for jobs that ended), and submits
the script `slurm-script` writes (`PilotJob.render`) with `sbatch`. Never through a shell."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import math
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import redis

from tbss_queue.config import Settings
from tbss_queue.errors import ConfigError
from tbss_queue.queue.broker import connect
from tbss_queue.queue.keys import ACTIVE, NODES, PREFIX, QUEUED, batch_key
from tbss_queue.slurm import PilotJob

log = logging.getLogger(__name__)

STATE = PREFIX + "autoalloc"
"""Hash: the manager's last view (per partition pending/running, last error, backoff)."""
PILOTS = PREFIX + "autoalloc:pilots"
"""Hash: job id -> JSON {partition, submitted}: the pilots this manager submitted and still
believes pending or running."""

DEFAULT_JOB_NAME = "tbss-queue-auto"
ALIVE_STATES = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED"})
BACKOFF_FIRST = 30.0
"""Seconds the manager waits before a partition's next sbatch after a first failure; doubled
at each further failure up to `max_backoff`."""
SLURM_TIMEOUT = 60
"""Seconds a Slurm client command may take (slurmctld can be slow on a busy cluster)."""


@dataclass(frozen=True)
class PartitionView:
    """Slurm's view of one partition's pilots, and whether sbatch may be called for it now."""

    name: str
    pending: int = 0
    running: int = 0  # running and still taking commands (not past their stop-after)
    blocked: bool = False  # backing off after sbatch failures


def pilots_needed(queued: int, per_pilot: int) -> int:
    """Pilots that run `queued` commands within one wall time, every command taking --expected."""
    return math.ceil(queued / max(1, per_pilot)) if queued > 0 else 0


def decide(
    queued: int, per_pilot: int, views: Sequence[PartitionView], max_pilots: int, backlog: int
) -> dict[str, int]:
    """Pilots to submit now, per partition: enough for the queued commands, the partitions
    taken in order (work the first cannot take spills to the next); within `max_pilots`
    (pending + running) and `backlog` (pending) per partition; none while nothing waits."""
    wanted = pilots_needed(queued, per_pilot)
    submit: dict[str, int] = {}
    for v in views:
        active = v.pending + v.running
        room = min(max_pilots - active, backlog - v.pending, wanted - active)
        n = 0 if v.blocked else max(0, room)
        submit[v.name] = n
        wanted = max(0, wanted - active - n)
    return submit


def backoff_delay(failures: int, first: float, cap: float) -> float:
    """Seconds to wait after the `failures`-th sbatch failure in a row: doubled each time."""
    return float(min(cap, first * 2 ** (failures - 1)))


@dataclass(frozen=True)
class AutoallocOptions:
    """What the manager submits and within which limits; resolved once by the CLI."""

    pilot: PilotJob
    partitions: tuple[str, ...] = ("",)  # "" = Slurm's default partition
    max_pilots: int = 4
    backlog: int = 1
    interval: float = 30.0
    retry_after: float = BACKOFF_FIRST
    max_backoff: float = 1800.0
    directory: str = "."  # where sbatch runs: the pilots' logs land here

    @property
    def per_pilot(self) -> int:
        """Commands one pilot surely runs before its stop-after, each taking --expected."""
        rounds = self.pilot.stop_after // max(1, self.pilot.expected) + 1
        return self.pilot.nodes * self.pilot.cpus_per_node * rounds

    def job(self, partition: str) -> PilotJob:
        return replace(self.pilot, partition=partition or None)


@dataclass(frozen=True)
class Pilot:
    job_id: str
    partition: str
    state: str
    started: float | None = None  # epoch seconds, once running


@dataclass
class Backoff:
    failures: int = 0
    until: float = 0.0
    error: str = ""


def _which(name: str) -> str:
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/bin", "/usr/local/bin"])
    found = shutil.which(name, path=path)
    if found is None:
        raise ConfigError(f"{name} not found: autoalloc runs where Slurm's commands do")
    return found


def _slurm(
    *argv: str,
    stdin: str | None = None,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[int, str, str]:
    res = subprocess.run(
        [_which(argv[0]), *argv[1:]],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=None if env is None else dict(env),
        timeout=SLURM_TIMEOUT,
    )
    return res.returncode, res.stdout, res.stderr.strip()


def _epoch(text: str) -> float | None:
    try:  # squeue prints local time without a zone
        return dt.datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def squeue(job_name: str) -> list[Pilot]:
    """This user's pilots of that name that Slurm still lists as pending or running."""
    user = os.environ.get("USER") or _user()
    rc, out, errs = _slurm("squeue", "-h", "-u", user, "-n", job_name, "-o", "%i|%P|%T|%S")
    if rc != 0:
        raise OSError(f"squeue failed: {errs}")
    pilots = []
    for line in out.splitlines():
        job_id, partition, state, start = line.split("|", 3)
        started = _epoch(start) if state != "PENDING" else None
        pilots.append(Pilot(job_id, partition, state, started))
    return [p for p in pilots if p.state in ALIVE_STATES]


def final_state(job_id: str) -> str:
    """How a job Slurm no longer lists as live ended: from sacct if accounting is on, else
    from scontrol (which knows a job for MinJobAge seconds after its end), else unknown."""
    rc, out, _ = _slurm("sacct", "-n", "-P", "-X", "-j", job_id, "-o", "State")
    if rc == 0 and out.strip():
        return out.split()[0]
    rc, out, _ = _slurm("scontrol", "show", "job", "-o", job_id)
    if rc == 0 and "JobState=" in out:
        return out.split("JobState=")[1].split()[0]
    return "UNKNOWN"


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


@dataclass
class Manager:
    """The loop: one `tick` every `interval` seconds until stopped."""

    settings: Settings
    options: AutoallocOptions
    r: redis.Redis = field(init=False)
    backoff: dict[str, Backoff] = field(default_factory=dict)
    ticks: int = 0

    def __post_init__(self) -> None:
        self.r = connect(self.settings)
        for p in self.options.partitions:
            self.options.job(p).render()  # a --time too short for --expected fails now

    def queued(self) -> int:
        """Commands waiting, over every batch that has not ended."""
        ids = [str(b) for b in self.r.smembers(ACTIVE)]
        pipe = self.r.pipeline(transaction=False)
        for b in ids:
            pipe.hget(batch_key(b, "counts"), QUEUED)
        return sum(int(n or 0) for n in pipe.execute())

    def tick(self, now: float | None = None) -> dict[str, int]:
        """Reconcile with Slurm, submit what `decide` asks; returns the pilots submitted."""
        now = time.time() if now is None else now
        queued = self.queued()
        live = squeue(self.options.pilot.job_name)
        connected = {str(n).split("@")[0] for n in self.r.hkeys(NODES)}
        self._reconcile(live, connected, now)
        for p in live:  # a pilot whose worker connected: its partition works again
            if f"slurm{p.job_id}" in connected:
                for part in self.options.partitions:
                    if not part or p.partition == part:
                        self.backoff.pop(part, None)
        views = []
        for part in self.options.partitions:
            mine = [p for p in live if not part or p.partition == part]
            pending = sum(p.state == "PENDING" for p in mine)
            taking = sum(
                p.state != "PENDING"
                and (p.started is None or now < p.started + self.options.pilot.stop_after)
                for p in mine
            )
            blocked = now < self.backoff.get(part, Backoff()).until
            views.append(PartitionView(part, pending, taking, blocked))
        plan = decide(
            queued, self.options.per_pilot, views, self.options.max_pilots, self.options.backlog
        )
        submitted = {part: self._submit(part, n, now) for part, n in plan.items()}
        self.ticks += 1
        self._save(queued, views, submitted, live, now)
        return submitted

    def run(self, stop: threading.Event | None = None) -> None:
        """Tick until `stop` is set or the process is signalled (SIGTERM: the pilots stay, and
        end when idle). A failing Redis or Slurm is said and tried again next tick."""
        log.info(
            "autoalloc: partitions %s, at most %d pilots (%d pending), %d commands per pilot",
            ", ".join(p or "(default)" for p in self.options.partitions),
            self.options.max_pilots,
            self.options.backlog,
            self.options.per_pilot,
        )
        while stop is None or not stop.is_set():
            try:
                self.tick()
            except (OSError, redis.RedisError, subprocess.SubprocessError) as exc:
                log.error("autoalloc: %s", exc)
                with contextlib.suppress(redis.RedisError):
                    self.r.hset(STATE, "error", f"autoalloc: {exc}")
            time.sleep(self.options.interval)

    def _submit(self, part: str, n: int, now: float) -> int:
        done = 0
        script = self.options.job(part).render()
        # the pilot's workers find the broker as the script says: exported (sbatch passes
        # the environment on), whether the manager was given --broker or the variable
        env = {**os.environ, "TBSS_QUEUE_BROKER": self.settings.broker}
        for _ in range(n):
            rc, out, errs = _slurm(
                "sbatch", "--parsable", stdin=script, cwd=self.options.directory, env=env
            )
            if rc != 0:
                said = [line.removeprefix("sbatch: error: ") for line in errs.splitlines()]
                why = "; ".join(line.strip() for line in said if line.strip())
                self._failed(part, f"sbatch failed: {why or f'exit status {rc}'}", now)
                break
            job_id = out.strip().split(";")[0]
            self.r.hset(PILOTS, job_id, json.dumps({"partition": part, "submitted": now}))
            log.info("pilot %s submitted to %s", job_id, part or "the default partition")
            if part in self.backoff:  # submitted again; failures count on until a worker connects
                self.backoff[part].error = ""
            done += 1
        return done

    def _failed(self, part: str, why: str, now: float) -> None:
        b = self.backoff.setdefault(part, Backoff())
        b.failures += 1
        wait = backoff_delay(b.failures, self.options.retry_after, self.options.max_backoff)
        b.until, b.error = now + wait, why
        name = part or "the default partition"
        log.error("%s: %s (failure %d; next try in %.0f s)", name, why, b.failures, wait)

    def _reconcile(self, live: Sequence[Pilot], connected: set[str], now: float) -> None:
        """Forget the pilots Slurm no longer runs, saying how each ended: `decide` then counts
        them out and replaces them if work waits. Their commands come back through the leases.
        One that ended before its worker ever connected (a broken script, a node that cannot
        reach Redis) counts as a failed submission: its partition backs off, no job storm."""
        known = {str(k): json.loads(v) for k, v in self.r.hgetall(PILOTS).items()}
        alive = {p.job_id for p in live}
        gone = [job_id for job_id in known if job_id not in alive]
        for job_id in gone:
            state = final_state(job_id)
            part = str(known[job_id].get("partition", ""))
            self.r.hdel(PILOTS, job_id)
            self.r.hincrby(STATE, f"ended:{state}", 1)
            if f"slurm{job_id}" not in connected and not state.startswith("CANCELLED"):
                self._failed(
                    part,
                    f"pilot {job_id} ended {state} before its worker connected "
                    f"(see tbss-queue-pilot-{job_id}.log in {self.options.directory})",
                    now,
                )
                continue
            level = logging.INFO if state == "COMPLETED" else logging.WARNING
            log.log(level, "pilot %s ended: %s", job_id, state)

    def _save(
        self,
        queued: int,
        views: Sequence[PartitionView],
        submitted: Mapping[str, int],
        live: Sequence[Pilot],
        now: float,
    ) -> None:
        parts = {
            v.name or "default": {
                "pending": v.pending,
                "running": sum(
                    p.state != "PENDING" and (not v.name or p.partition == v.name) for p in live
                ),
                "submitted": submitted.get(v.name, 0),
                "error": self.backoff[v.name].error if v.name in self.backoff else "",
                "failures": self.backoff[v.name].failures if v.name in self.backoff else 0,
                "retry_at": self.backoff[v.name].until if v.name in self.backoff else 0,
            }
            for v in views
        }
        errors = [
            f"{k}: {p['error']} ({p['failures']} in a row; next try in "
            f"{max(0.0, float(p['retry_at']) - now):.0f} s)"
            for k, p in parts.items()
            if p["error"]
        ]
        pipe = self.r.pipeline()
        pipe.hset(
            STATE,
            mapping={
                "updated": now,
                "ticks": self.ticks,
                "queued": queued,
                "partitions": json.dumps(parts),
                "error": "; ".join(errors),
                "pid": os.getpid(),
                "interval": self.options.interval,
            },
        )
        pipe.hincrby(STATE, "submitted", sum(submitted.values()))
        pipe.execute()


def read_state(r: redis.Redis) -> dict[str, str]:
    """The manager's last saved view (empty if no manager ever ran on this broker)."""
    return {str(k): str(v) for k, v in r.hgetall(STATE).items()}


def pilot_notes(state: Mapping[str, str], now: float | None = None) -> list[str]:
    """`status`'s lines on the pilots: per partition pending and running, and why the manager
    submits none (sbatch failing, or the manager silent)."""
    if not state.get("partitions"):
        return []
    now = time.time() if now is None else now
    parts = json.loads(state["partitions"])
    shown = ", ".join(
        f"{k} {p['pending']} pending, {p['running']} running" for k, p in parts.items()
    )
    lines = [f"pilots (autoalloc): {shown}"]
    age = now - float(state.get("updated", now))
    if age > 3 * float(state.get("interval", 30)) + 30:
        lines.append(f"autoalloc silent for {age:.0f} s: is `tbss-queue autoalloc` running?")
    if state.get("error"):
        lines.append(f"autoalloc submits no pilot: {state['error']}")
    return lines


def directory_or_cwd(path: str | None) -> str:
    chosen = Path(path or ".").resolve()
    if not chosen.is_dir():
        raise ConfigError(f"--dir {chosen}: not a directory")
    return str(chosen)
