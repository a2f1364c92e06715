"""Pausing a node's commands for the owner of a lent machine: SIGSTOP of each command's
process group, SIGCONT when the owner policy (owner.py, in the worker's main process) lets
them go on, a hand-back when they stayed paused too long or the node's hours ended.

The main process decides; each pool process acts on its own command, which it alone knows
exactly (its group, its time limit, how long Celery's hard limit leaves it). What the main
process decides lies in a few bytes of anonymous shared memory, mapped before Celery forks its
pool, which the runner reads at every look (no system call, no Redis round trip). The runner
keeps renewing a paused command's lease, so no other node takes it over, and its own time
limit does not count paused time.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import signal
import struct
import time

from tbss_queue.execution.runner import Stop

RUN, PAUSE, EVICT = 0, 1, 2
"""What running commands do: go on; stay stopped; be handed back (the node's hours ended
and --grace passed)."""

LOOK_EVERY = 0.2
"""Seconds between a runner's looks at the shared state while the owner policy is on."""


class Shared:
    """The owner policy's word to the pool processes: mode, whether new commands may start,
    the longest pause. Anonymous shared memory: created before the pool forks, it is the same
    memory in every pool process (single fields, each written whole: no lock needed)."""

    LAYOUT = struct.Struct("<BBd")

    def __init__(self, max_pause: float, taking: bool = True) -> None:
        self.mem = mmap.mmap(-1, self.LAYOUT.size)
        self.LAYOUT.pack_into(self.mem, 0, RUN, int(taking), max_pause)

    @property
    def mode(self) -> int:
        return int(self.mem[0])

    @property
    def taking(self) -> bool:
        return bool(self.mem[1])

    @property
    def max_pause(self) -> float:
        return float(self.LAYOUT.unpack_from(self.mem)[2])

    def set(self, mode: int, taking: bool) -> None:
        self.mem[1] = int(taking)
        self.mem[0] = mode


_SHARED: Shared | None = None


def install(max_pause: float, taking: bool) -> Shared:
    """Called by the worker's main process before its pool forks (once per node)."""
    global _SHARED
    _SHARED = Shared(max_pause, taking)
    return _SHARED


def held() -> bool:
    """True if this node takes no new command now (paused, or outside its hours): a command
    delivered meanwhile is handed back unstarted."""
    return _SHARED is not None and not _SHARED.taking


def for_command(budget: float) -> Pausing | None:
    """The pauses of the command about to start, or None when the owner policy is off.
    `budget`: the seconds of pause Celery's hard limit leaves it (see Pausing)."""
    return None if _SHARED is None else Pausing(_SHARED, budget)


class Pausing:
    """One running command's pauses. Its paused time may add up to the smaller of --max-pause
    and `budget`: Celery's hard limit counts from the delivery and allows START_BUDGET for the
    start; what the start did not use is what a pause may use (publish.HARD_LIMIT_MARGIN)."""

    poll = LOOK_EVERY

    def __init__(self, shared: Shared, budget: float) -> None:
        self.shared = shared
        self.limit = max(0.0, min(shared.max_pause, budget))
        self.since: float | None = None  # monotonic time of this pause's start
        self.total = 0.0  # seconds paused before it

    def paused_for(self) -> float:
        """Seconds paused so far: the command's own time limit is extended by as much."""
        ongoing = 0.0 if self.since is None else time.monotonic() - self.since
        return self.total + ongoing

    def step(self, pgid: int) -> Stop | None:
        """Stop or continue the command's group as the policy says; a Stop hands it back."""
        mode = self.shared.mode
        if mode == EVICT:
            return Stop("the node's --hours ended and --grace passed")
        if mode == PAUSE and self.since is None:
            _signal(pgid, signal.SIGSTOP)
            self.since = time.monotonic()
        elif mode == RUN and self.since is not None:
            _signal(pgid, signal.SIGCONT)
            self.total += time.monotonic() - self.since
            self.since = None
        if self.since is not None and self.paused_for() > self.limit:
            return Stop(f"paused longer than {self.limit:.0f} s (--max-pause)")
        return None


def _signal(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
