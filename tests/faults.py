"""Helpers of the fault tests: the stand-in command, per-command marker files, waiting."""

from __future__ import annotations

import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import psutil

JOB = str(Path(__file__).parent / "bin" / "job.py")


def job(i: object, log: Path, *extra: str) -> str:
    return f"{sys.executable} {JOB} {i} --log {log} " + " ".join(extra)


def ran(log: Path) -> Counter[str]:
    return Counter(log.read_text().split()) if log.exists() else Counter()


def wait_until(cond: Callable[[], bool], timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def alive(pids: Iterable[int]) -> list[int]:
    out = []
    for p in pids:
        try:
            if psutil.Process(p).status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def gone(pids: list[int], timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pids):
            return True
        time.sleep(0.1)
    return False


@dataclass(frozen=True)
class Mark:
    kind: str  # start or done
    pid: int
    time: float


class Markers:
    """The marker files job.py --marker DIR writes: DIR/ID holds 'start PID TIME' and
    'done PID TIME' lines, one per copy of the command that started or completed."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)

    def of(self, cid: str) -> list[Mark]:
        path = self.dir / cid
        if not path.exists():
            return []
        marks = []
        for line in path.read_text().splitlines():
            kind, pid, when = line.split()
            marks.append(Mark(kind, int(pid), float(when)))
        return marks

    def starts(self, cid: str) -> list[Mark]:
        return [m for m in self.of(cid) if m.kind == "start"]

    def dones(self, cid: str) -> list[Mark]:
        return [m for m in self.of(cid) if m.kind == "done"]

    def counts(self, ids: Iterable[str]) -> dict[str, tuple[int, int]]:
        """id -> (copies started, copies completed)."""
        return {i: (len(self.starts(i)), len(self.dones(i))) for i in ids}

    def assert_exactly_once(self, ids: Iterable[str], *, restarts: bool = False) -> None:
        """Every command completed exactly once; without `restarts`, it also started once."""
        counts = self.counts(ids)
        assert all(d == 1 for _, d in counts.values()), f"not completed once: {counts}"
        if not restarts:
            assert all(s == 1 for s, _ in counts.values()), f"started more than once: {counts}"

    def ids(self) -> list[str]:
        return sorted(p.name for p in self.dir.iterdir())


def tree(pid: int) -> list[int]:
    """pid and every descendant of it."""
    try:
        proc = psutil.Process(pid)
        return [pid, *(c.pid for c in proc.children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def signal_all(pids: Iterable[int], sig: int = signal.SIGKILL) -> None:
    for p in pids:
        try:
            psutil.Process(p).send_signal(sig)
        except psutil.NoSuchProcess:
            pass
