"""What the kernel says about this node's memory: its cgroup's limit, use and OOM kills (cgroup
v2, or v1's memory controller on a hybrid host), the machine's, and a command tree's RSS.

Plain file reads, no Celery and no Redis: the runner samples these while a command runs, and
admission (resources.py) reads them before a claim. Every reading degrades to None (or the
machine's figure) where a file is missing, so a node without cgroups still runs.
"""

from __future__ import annotations

import functools
import os
import resource
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tbss_queue.execution import procs

UNLIMITED = 2**60
"""A v1 limit this large (the kernel's 'max', rounded to pages) means no limit."""


def _read(path: Path | str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _field(text: str | None, name: str) -> int | None:
    """The value of `name` in a 'key value' file (memory.events, memory.stat, vmstat)."""
    for line in (text or "").splitlines():
        key, _, value = line.partition(" ")
        if key == name and value.strip().isdigit():
            return int(value)
    return None


@dataclass(frozen=True)
class Cgroup:
    """The memory cgroup a process is in: its directory and whether it is cgroup v2."""

    path: Path
    v2: bool

    @classmethod
    def of(cls, pid: int | str = "self") -> Cgroup | None:
        """The memory cgroup of `pid` (v1's memory controller first: a hybrid host has a v2
        mount without it), or None if it can't be read."""
        text = _read(f"/proc/{pid}/cgroup") or ""
        for line in text.splitlines():
            _, controllers, rel = line.split(":", 2)
            if "memory" in controllers.split(","):
                path = Path("/sys/fs/cgroup/memory", rel.lstrip("/"))
                if (path / "memory.limit_in_bytes").exists():
                    return cls(path, v2=False)
        for line in text.splitlines():
            if line.startswith("0::"):
                for root in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
                    path = Path(root, line[3:].lstrip("/"))
                    if (path / "memory.max").exists():
                        return cls(path, v2=True)
        return None

    def limit(self) -> int | None:
        """Its memory limit in bytes, None if it has none."""
        raw = _read(self.path / ("memory.max" if self.v2 else "memory.limit_in_bytes"))
        if raw is None or not raw.strip().isdigit():
            return None
        value = int(raw)
        return None if value >= UNLIMITED else value

    def usage(self) -> int | None:
        """Memory charged to it less the page cache the kernel drops first (inactive files),
        as `docker stats` counts it."""
        raw = _read(self.path / ("memory.current" if self.v2 else "memory.usage_in_bytes"))
        if raw is None or not raw.strip().isdigit():
            return None
        stat = _read(self.path / "memory.stat")
        cache = _field(stat, "inactive_file" if self.v2 else "total_inactive_file") or 0
        return max(0, int(raw) - cache)

    def peak(self) -> int | None:
        """The most memory it ever held (v2's memory.peak, v1's max_usage_in_bytes)."""
        raw = _read(self.path / ("memory.peak" if self.v2 else "memory.max_usage_in_bytes"))
        return int(raw) if raw is not None and raw.strip().isdigit() else None

    def oom_kills(self) -> int | None:
        """Processes the kernel killed in it for want of memory, so far."""
        if self.v2:
            return _field(_read(self.path / "memory.events"), "oom_kill")
        return _field(_read(self.path / "memory.oom_control"), "oom_kill")


def machine_oom_kills() -> int | None:
    """OOM kills anywhere on the machine since boot (/proc/vmstat oom_kill)."""
    return _field(_read("/proc/vmstat"), "oom_kill")


def _meminfo(name: str) -> int | None:
    """A /proc/meminfo figure, in bytes."""
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024
    return None


def machine_available() -> int | None:
    """MemAvailable: what the machine can give without swapping."""
    return _meminfo("MemAvailable")


def machine_total() -> int:
    """MemTotal, in bytes."""
    total = _meminfo("MemTotal")
    return total if total is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_budget() -> int:
    """A node's memory budget when `worker --mem` is not given: the machine's memory, or its
    cgroup's limit if lower (a Slurm job's --mem, a container's limit)."""
    group = Cgroup.of()
    limit = group.limit() if group is not None else None
    return min(machine_total(), limit) if limit else machine_total()


def available() -> int | None:
    """What this node can still take: its cgroup's limit less its use, or the machine's
    MemAvailable, whichever is less."""
    group = _own_group()
    figures = [machine_available()]
    if group is not None and (limit := group.limit()) is not None:
        used = group.usage()
        figures.append(None if used is None else max(0, limit - used))
    known = [f for f in figures if f is not None]
    return min(known) if known else None


@dataclass(frozen=True)
class OomCount:
    """OOM kills so far in this node's cgroup and on the machine: taken before a command and
    compared after it."""

    cgroup: int | None
    machine: int | None

    @classmethod
    def now(cls, group: Cgroup | None) -> OomCount:
        # the root group counts no kill in its children: the machine's count serves there
        counted = group is not None and group.path.name not in ("memory", "cgroup", "unified")
        own = group.oom_kills() if counted and group else None
        return cls(own, machine_oom_kills() if own is None else None)

    def rose_since(self, before: OomCount) -> bool:
        """The node's cgroup counts every OOM kill of its processes, whatever ran out (its
        limit or the machine); the machine's count, which other users' kills raise too, is
        read only where there is no cgroup count."""
        if before.cgroup is not None and self.cgroup is not None:
            return self.cgroup > before.cgroup
        was, now = before.machine, self.machine
        return was is not None and now is not None and now > was


def tree(pid: int) -> list[int]:
    """pid and its descendants (those still its descendants: /proc children files)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += procs.children(p)
    return found


def tree_rss(pid: int) -> tuple[int, int]:
    """(resident memory now, sum of each process's own peak) of pid's tree, in bytes: the first
    is what it holds, the second bounds what it held at once (VmHWM, read from /proc)."""
    rss = hwm = 0
    for p in tree(pid):
        status = _read(f"/proc/{p}/status") or ""
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                hwm += int(line.split()[1]) * 1024
    return rss, hwm


SAMPLE_EVERY = 0.25
"""Seconds between samples of a running command's tree RSS (a few /proc reads)."""


class Sampler:
    """A command's memory while it runs: its tree's peak, and whether the kernel OOM-killed
    it (an OOM kill counted in this node's cgroup, or on the machine, while it ran)."""

    def __init__(self, on_sample: Callable[[int], None] | None = None) -> None:
        self.on_sample = on_sample
        self.group = _own_group()
        self.before = OomCount.now(self.group)
        self.peak = 0
        self.reaped_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024

    def sample(self, pid: int) -> None:
        rss, hwm = tree_rss(pid)
        self.peak = max(self.peak, hwm)
        if self.on_sample is not None:
            self.on_sample(rss)

    def ended(self) -> int:
        """The tree's peak RSS, the command reaped: its largest process's own peak counts too
        (RUSAGE_CHILDREN's maximum, when it rose), which no sample can miss."""
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        return max(self.peak, reaped if reaped > self.reaped_peak else 0)

    def oom_rose(self) -> bool:
        """Whether an OOM kill was counted while it ran: a command that failed then is taken
        for the one killed, or one whose process was (fnirt under fsl_reg, which goes on)."""
        return OomCount.now(self.group).rose_since(self.before)


@functools.cache
def _own_group() -> Cgroup | None:
    """This process's memory cgroup, looked up once (a worker does not move)."""
    return Cgroup.of()
