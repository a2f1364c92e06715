"""The owner policy of a lent machine (HTCondor's desktop policy, GNU parallel's --load): the
node takes commands only in its --hours, and pauses its commands while other processes load
the machine past --yield-load.

It runs in the worker's main process, as a thread that looks once per load window. What it
decides goes to the pool processes through pausing.Shared (they stop, continue or hand back
their own commands), to Celery's consumer (no new command while paused or outside the
hours), and to Redis (the node's `paused` state and its reason, for status, nodes, Flower).
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil

from tbss_queue.errors import ConfigError
from tbss_queue.execution import pausing
from tbss_queue.queue.publish import START_BUDGET

log = logging.getLogger(__name__)

DEFAULT_LOAD_WINDOW = 10.0
"""Seconds over which the load of other processes is measured, once per look."""

CALM_WINDOWS = 6
"""Paused commands go on once the load has stayed at or under half of --yield-load for this
many windows in a row (a minute by default): an owner who pauses to read does not get the
machine back busy the moment they stop typing."""

MAX_PAUSE_LIMIT = float(START_BUDGET)
"""The longest --max-pause: Celery's hard limit, counted from the delivery, leaves a command
START_BUDGET seconds for its start (publish.HARD_LIMIT_MARGIN); a pause uses what is left."""

DEFAULT_MAX_PAUSE = MAX_PAUSE_LIMIT


@dataclass(frozen=True)
class Hours:
    """The hours a node takes commands in, 'HH:MM-HH:MM' by the local clock; the end may be
    after midnight (19:00-07:00)."""

    start: int  # minutes after midnight
    end: int
    text: str

    @classmethod
    def parse(cls, text: str) -> Hours:
        """'19:00-07:00' -> Hours; a bad value is one line naming --hours."""
        m = re.fullmatch(r"(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})", text.strip())
        values = [int(g) for g in m.groups()] if m else []
        if not m or values[0] > 23 or values[2] > 23 or values[1] > 59 or values[3] > 59:
            raise ConfigError(f"--hours {text!r}: expected HH:MM-HH:MM, e.g. 19:00-07:00")
        start, end = values[0] * 60 + values[1], values[2] * 60 + values[3]
        if start == end:
            raise ConfigError(f"--hours {text!r}: starts and ends at the same time")
        return cls(start, end, text.strip())

    def contain(self, now: dt.datetime) -> bool:
        minute = now.hour * 60 + now.minute
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end  # across midnight


@dataclass(frozen=True)
class OwnerPolicy:
    """What a lent machine's owner asked of this node (all off by default)."""

    hours: Hours | None = None
    yield_load: float | None = None  # CPUs busy with other processes that pause commands
    max_pause: float = DEFAULT_MAX_PAUSE
    load_window: float = DEFAULT_LOAD_WINDOW
    clock_file: str | None = None
    """Tests only: a file holding the local time (ISO) the policy takes as now."""
    load_scope: int | None = None
    """Tests only: count the load of this process's descendants alone (the suite shares its
    machine with other work; its burners descend from this process)."""

    @property
    def active(self) -> bool:
        return self.hours is not None or self.yield_load is not None

    def check(self) -> OwnerPolicy:
        """This policy, or a ConfigError naming the option that can't be kept."""
        if self.yield_load is not None and self.yield_load <= 0:
            raise ConfigError(f"--yield-load {self.yield_load:g}: must be more than 0 CPUs")
        if not 0 < self.max_pause <= MAX_PAUSE_LIMIT:
            raise ConfigError(
                f"--max-pause {self.max_pause:g} s: must be more than 0 and at most "
                f"{MAX_PAUSE_LIMIT:.0f} s (Celery's hard time limit would cut a command "
                "paused longer)"
            )
        if self.load_window <= 0:
            raise ConfigError("--load-window: must be more than 0 seconds")
        return self

    def now(self) -> dt.datetime:
        if self.clock_file is not None:
            try:
                with open(self.clock_file) as f:
                    return dt.datetime.fromisoformat(f.read().strip())
            except (OSError, ValueError):
                log.warning("clock file %s unreadable: using the real clock", self.clock_file)
        return dt.datetime.now()


class OthersLoad:
    """The CPU use of every process but this worker's own tree (its pool processes, their
    guards and commands), in CPUs, over a window: unlike the load average it leaves out our
    own commands and follows a change within one window."""

    def __init__(self, scope: int | None = None) -> None:
        self.me = psutil.Process()
        self.scope = scope

    def _times(self) -> dict[tuple[int, float], float]:
        ours = {self.me.pid, *(p.pid for p in self.me.children(recursive=True))}
        if self.scope is not None:
            try:
                procs = psutil.Process(self.scope).children(recursive=True)
            except psutil.NoSuchProcess:
                procs = []
        else:
            procs = list(psutil.process_iter())
        out = {}
        for p in procs:
            if p.pid in ours:
                continue
            try:
                t = p.cpu_times()
                out[(p.pid, p.create_time())] = t.user + t.system
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return out

    def sample(self, window: float, stop: threading.Event) -> float:
        """CPUs used by other processes over the next `window` seconds (those that lived to
        its end; one that began within it counts whole)."""
        began, before = time.monotonic(), self._times()
        stop.wait(window)
        after = self._times()
        spent = sum(t - before.get(key, 0.0) for key, t in after.items())
        return max(0.0, spent / max(1e-3, time.monotonic() - began))


@dataclass(frozen=True)
class Decision:
    """What the node does now: the mode of its running commands, whether it takes new ones,
    and why it is paused (None: it is not)."""

    mode: int
    taking: bool
    reason: str | None


class Owner:
    """The policy's state from look to look: paused by load (with hysteresis), outside hours
    since when."""

    def __init__(self, policy: OwnerPolicy, grace: float) -> None:
        self.policy, self.grace = policy, grace
        self.loaded = False
        self.calm = 0
        self.out_since: float | None = None

    def decide(self, now: dt.datetime, load: float | None, clock: float) -> Decision:
        p = self.policy
        if p.yield_load is not None and load is not None:
            if load > p.yield_load:
                self.loaded, self.calm = True, 0
            elif self.loaded:
                self.calm = self.calm + 1 if load <= p.yield_load / 2 else 0
                self.loaded = self.calm < CALM_WINDOWS
        inside = p.hours is None or p.hours.contain(now)
        if inside or self.out_since is None:
            self.out_since = None if inside else clock
        reasons = []
        if not inside and p.hours is not None:
            reasons.append(f"outside hours {p.hours.text}")
        if self.loaded:
            shown = "" if load is None else f" {load:.1f} CPUs,"
            reasons.append(f"load of other processes{shown} over --yield-load {p.yield_load:g}")
        evict = self.out_since is not None and clock - self.out_since >= self.grace
        mode = pausing.EVICT if evict else pausing.PAUSE if self.loaded else pausing.RUN
        return Decision(mode, not reasons, "; ".join(reasons) or None)


def watch(
    policy: OwnerPolicy,
    grace: float,
    shared: pausing.Shared,
    consume: Callable[[bool], None],
    publish: Callable[[str | None], None],
    stop: threading.Event,
) -> None:
    """The policy's loop, until `stop`: decide (the hours first, so a node started outside
    them stops consuming at once), then measure the load over the next window. Only changes
    reach Celery's consumer (`consume(taking)`) and Redis (`publish(reason)`)."""
    owner, sampler = Owner(policy, grace), OthersLoad(policy.load_scope)
    last, load = Decision(pausing.RUN, True, None), None
    _said(publish, None)  # a paused state left by an earlier run of this node is over
    while True:
        now = owner.decide(policy.now(), load, time.monotonic())
        shared.set(now.mode, now.taking)
        try:
            if now.taking != last.taking:
                consume(now.taking)
            if _kinds(now) != _kinds(last):
                log.warning("%s", f"paused: {now.reason}" if now.reason else "taking commands")
                _said(publish, now.reason)
            last = now
        except Exception:  # the consumer mid-reconnect: the next look tries again
            log.warning("could not apply the owner policy; trying again", exc_info=True)
        if stop.is_set():
            return
        if policy.yield_load is not None:
            load = sampler.sample(policy.load_window, stop)
        else:
            stop.wait(policy.load_window)


def _said(publish: Callable[[str | None], None], reason: str | None) -> None:
    """Record the node's state; Redis away, the node goes on (its heartbeats say more)."""
    try:
        publish(reason)
    except Exception:
        log.warning("could not record the node's paused state", exc_info=True)


def share(policy: OwnerPolicy) -> pausing.Shared | None:
    """The shared memory of the policy's word, mapped before the pool forks; None when off."""
    return pausing.install(policy.max_pause, initial(policy)) if policy.active else None


def _kinds(d: Decision) -> tuple[bool, bool]:
    """Why a node is paused, as far as its state shows: the hours, the load (not its figure,
    which changes at every look)."""
    why = d.reason or ""
    return "outside hours" in why, "load of other" in why


def initial(policy: OwnerPolicy) -> bool:
    """Whether the node may take commands as it starts (before the policy's first look)."""
    return policy.hours is None or policy.hours.contain(policy.now())


def describe(policy: OwnerPolicy) -> list[str]:
    """The banner's lines for the policy."""
    lines = []
    if policy.hours is not None:
        lines.append(f"--hours {policy.hours.text}: takes commands in these hours only")
    if policy.yield_load is not None:
        lines.append(
            f"--yield-load {policy.yield_load:g}: pauses commands while other processes use "
            f"more CPUs (measured over {policy.load_window:g} s); hands them back after "
            f"--max-pause {policy.max_pause:g} s"
        )
    return lines


def consumer_switch(consumer: Any, queue: str) -> Callable[[bool], None]:
    """consume(bool) for `watch`: Celery's consumer cancels the queue (as _drain does) when
    the node stops taking commands. Taking them again is the node's health check's to do, at
    its next beat, as after a quarantine: it alone knows whether the node is quarantined or
    stopping, and it re-adds the queue only while `pausing.held()` is false."""

    def consume(taking: bool) -> None:
        if not taking:
            consumer.cancel_task_queue(queue)

    return consume
