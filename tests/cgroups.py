"""A memory cgroup of the test's own (a child of the one the suite runs in, v1 or v2) for
worker nodes with a real memory limit; every process in it killed and the group removed."""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from collections.abc import Iterator

import pytest

from tbss_queue.execution.memory import Cgroup


class MemoryCgroup:
    """A child memory cgroup with a limit; `wrap` starts a command inside it."""

    def __init__(self, limit: int) -> None:
        parent = Cgroup.of()
        if parent is None or os.geteuid() != 0:
            pytest.skip("needs root and a memory cgroup (v1 or v2) to create child groups in")
        self.path = parent.path / f"tbssq-test-{uuid.uuid4().hex[:8]}"
        self.v2 = parent.v2
        try:
            if self.v2:  # the child's controllers come from its parent's subtree_control
                (parent.path / "cgroup.subtree_control").write_text("+memory")
            self.path.mkdir()
        except OSError as exc:
            pytest.skip(f"cannot create a memory cgroup under {parent.path}: {exc}")
        if self.v2:
            (self.path / "memory.max").write_text(str(limit))
            with contextlib.suppress(OSError):
                (self.path / "memory.swap.max").write_text("0")
        else:
            (self.path / "memory.limit_in_bytes").write_text(str(limit))
            with contextlib.suppress(OSError):
                (self.path / "memory.swappiness").write_text("0")
        self.group = Cgroup(self.path, self.v2)

    @property
    def wrap(self) -> tuple[str, ...]:
        """A command prefix: the shell moves itself into the group, then execs the command."""
        procs = self.path / "cgroup.procs"
        return ("sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh")

    def pids(self) -> list[int]:
        text = (self.path / "cgroup.procs").read_text() if self.path.exists() else ""
        return [int(p) for p in text.split()]

    def oom_kills(self) -> int:
        return self.group.oom_kills() or 0

    def remove(self) -> None:
        """Kill everything in it, then remove it (a group with processes can't be removed)."""
        deadline = time.monotonic() + 15
        while (pids := self.pids()) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        while self.path.exists() and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                self.path.rmdir()
            time.sleep(0.05)


@contextlib.contextmanager
def memory_cgroup(limit: int) -> Iterator[MemoryCgroup]:
    group = MemoryCgroup(limit)
    try:
        yield group
    finally:
        group.remove()
