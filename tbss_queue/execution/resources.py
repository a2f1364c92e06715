"""What a command asks of a node (memory, threads) and whether the node can give it now.

A node's budget is its memory (`worker --mem`, by default the machine's or its cgroup's limit)
and its slots (--concurrency). Its pool processes share one `Ledger` of what runs: a memfd the
main worker process maps before the pool forks, locked with POSIX record locks (one owner per
process, dropped by the kernel when a process dies), so no Redis round trip and no daemon.

A command is admitted BEFORE its claim, so a node that can't run it has not taken it from the
others: when its declared request fits what the others declared, AND the measured memory
(what the cgroup or machine has available, less what running commands may still grow into:
their request less their tree's RSS now) holds it. One that does not fit waits up to
ADMIT_WAIT lost-after periods, then goes back to the queue unclaimed; one larger than the
whole node at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import mmap
import os
import struct
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from celery.exceptions import Ignore

from tbss_queue.config import cpu_count
from tbss_queue.execution import memory, oom
from tbss_queue.execution.lease import Attempt
from tbss_queue.fsl.outputs import parse_fsl_reg
from tbss_queue.queue.publish import START_BUDGET
from tbss_queue.sizes import human

log = logging.getLogger(__name__)

FSL_REG_MEM = 2 * 2**30
"""What an fsl_reg line needs when its batch says nothing: FNIRT at FSL's default 1 mm
registration of a 2 mm FA map to FMRIB58 holds its warp fields and Hessian at 1-2 GB (FSL's
own fsl_sub configs ask 2 GB for it); asking the top of that range means a node never starts
more than it can hold. A node with less runs one at a time."""

THREAD_VARS = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS",
    "FSLSUB_PARALLEL",
)
"""Set to a command's thread count: OpenMP (FSL 6's fnirt, eddy), BLAS, ITK, and fsl_sub's own
variable, which FSL's scripts read for how many threads they may use."""

ADMIT_WAIT = 2
"""LOST_AFTER periods (2 min by default) a command that does not fit waits for running ones to
end before it goes back to the queue unclaimed: long enough for a short command to end, short
enough that another node soon gets the chance; never past half of START_BUDGET from its
delivery, so that it still starts well within Celery's hard limit."""

ADMIT_POLL = 0.1
"""Seconds between looks at the ledger while a command waits to fit."""


@dataclass(frozen=True)
class Request:
    """What one command asks of a node: bytes of memory (0: nothing declared) and slots."""

    mem: int = 0
    threads: int = 1
    defaulted: bool = False
    """`mem` is FSL_REG_MEM, not the batch's: a node with less runs it alone, not never."""
    peak: int = 0
    """The peak at which this node's kernel killed it (0: never): its need here was raised."""


def request_of(argv: Sequence[str], mem: int | None, threads: int | None) -> Request:
    """The batch's request, or FSL_REG_MEM for an fsl_reg line whose batch asked none."""
    if mem is None and parse_fsl_reg(argv) is not None:
        return Request(FSL_REG_MEM, threads or 1, defaulted=True)
    return Request(mem or 0, threads or 1)


def thread_env(env: Mapping[str, str], threads: int | None) -> dict[str, str]:
    """The command's environment with every THREAD_VARS at its thread count, when it has one."""
    if threads is None:
        return dict(env)
    return {**env, **{var: str(threads) for var in THREAD_VARS}}


class Ledger:
    """What the commands of one node hold: shared by its pool processes (see the module)."""

    HEAD = struct.Struct("<qq")  # budget bytes, slots
    ENTRY = struct.Struct("<qqqq")  # pool pid, mem, threads, tree RSS now
    NEED = struct.Struct("<16sqq")  # command key, its need here after an OOM kill, its peak
    NEEDS = 64

    def __init__(self, budget: int, slots: int) -> None:
        self.budget, self.slots = budget, slots
        self.entries = max(slots, 1) * 2  # replaced pool processes leave theirs until dropped
        size = self.HEAD.size + self.entries * self.ENTRY.size + self.NEEDS * self.NEED.size
        self.fd = os.memfd_create("tbss-queue-ledger", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.mem = mmap.mmap(self.fd, size)
        self.HEAD.pack_into(self.mem, 0, budget, slots)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def _at(self, i: int) -> int:
        return self.HEAD.size + i * self.ENTRY.size

    def _rows(self) -> list[tuple[int, int, int, int, int]]:
        """(index, pid, mem, threads, rss) of every entry, live or not."""
        return [(i, *self.ENTRY.unpack_from(self.mem, self._at(i))) for i in range(self.entries)]

    def held(self) -> list[tuple[int, int, int, int, int]]:
        """The entries of live pool processes; those of dead ones are dropped (locked)."""
        live = []
        for row in self._rows():
            i, pid = row[0], row[1]
            if pid and not _alive(pid):
                self.ENTRY.pack_into(self.mem, self._at(i), 0, 0, 0, 0)
            elif pid:
                live.append(row)
        return live

    def why_not(self, need: Request, available: int | None) -> str | None:
        """Why `need` can't start now (locked), or None: then this process holds it."""
        held = [r for r in self.held() if r[1] != os.getpid()]
        mem, slots = sum(r[2] for r in held), sum(r[3] for r in held)
        if slots + need.threads > self.slots:
            return f"{slots} of {self.slots} slots taken"
        if mem + need.mem > self.budget:
            return f"{human(mem)} of {human(self.budget)} asked by running commands"
        growth = sum(max(0, r[2] - r[4]) for r in held)
        if need.mem and available is not None and available - growth < need.mem:
            return f"{human(available)} available, {human(growth)} of it still to be grown into"
        free = next((r[0] for r in self._rows() if r[1] in (0, os.getpid())), None)
        if free is None:
            return "no free entry in the ledger"
        self.ENTRY.pack_into(self.mem, self._at(free), os.getpid(), need.mem, need.threads, 0)
        return None

    def release(self) -> None:
        with self.locked():
            for i, pid, *_ in self._rows():
                if pid == os.getpid():
                    self.ENTRY.pack_into(self.mem, self._at(i), 0, 0, 0, 0)

    def note_rss(self, rss: int) -> None:
        """The tree RSS of this process's command now (the runner's samples; no lock: one
        aligned word, read by admission's measured test)."""
        for i, pid, *_ in self._rows():
            if pid == os.getpid():
                struct.pack_into("<q", self.mem, self._at(i) + 24, rss)

    def need(self, key: bytes, asked: Request) -> Request:
        """What the command needs here: its request, or more after an OOM kill here."""
        for i in range(self.NEEDS):
            k, mem, peak = self.NEED.unpack_from(self.mem, self._need_at(i))
            if k == key:
                return Request(max(asked.mem, mem), asked.threads, peak=peak)
        if asked.defaulted:
            return Request(min(asked.mem, self.budget), asked.threads)
        return asked

    def raise_need(self, key: bytes, mem: int, peak: int) -> None:
        """After an OOM kill here at `peak`: the command runs here only with `mem` free."""
        with self.locked():
            slots = [self.NEED.unpack_from(self.mem, self._need_at(i)) for i in range(self.NEEDS)]
            i = next((j for j, (k, *_) in enumerate(slots) if k in (key, bytes(16))), None)
            if i is None:  # full: the one its key's hash picks is forgotten
                i = key[0] % self.NEEDS
            self.NEED.pack_into(self.mem, self._need_at(i), key, mem, peak)

    def _need_at(self, i: int) -> int:
        return self.HEAD.size + self.entries * self.ENTRY.size + i * self.NEED.size


def node_ledger(options: Any) -> Ledger:
    """The ledger of a node started with these WorkerOptions (made before the pool forks)."""
    return Ledger(options.mem or memory.default_budget(), options.concurrency or cpu_count())


def budget_facts(options: Any) -> dict[str, int]:
    """What a node announces of its budget: `status` and `submit` compare requests to it."""
    return {
        "mem_budget": options.mem or memory.default_budget(),
        "slots": options.concurrency or cpu_count(),
    }


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def command_key(batch_id: str, task_id: str) -> bytes:
    return hashlib.blake2b(f"{batch_id}|{task_id}".encode(), digest_size=16).digest()


@dataclass(frozen=True)
class Share:
    """The part of the ledger one admitted command holds."""

    ledger: Ledger
    key: bytes
    need: Request

    def note_rss(self, rss: int) -> None:
        self.ledger.note_rss(rss)

    def alone(self) -> bool:
        with self.ledger.locked():
            return not [r for r in self.ledger.held() if r[1] != os.getpid()]


@contextlib.contextmanager
def admitted(
    at: Attempt, ledger: Ledger | None, asked: Request, began: float
) -> Iterator[Share | None]:
    """Hold the command's share of the node while it is claimed and runs, once it fits; or give
    it back to the queue unclaimed (Ignore) if it does not fit in time, or never could here."""
    if ledger is None:
        yield None
        return
    key = command_key(at.batch_id, at.task_id)
    need = ledger.need(key, asked)
    if need.mem > ledger.budget or need.threads > ledger.slots:
        if need.peak and oom.killed_on_every_node(at):
            oom.fail_everywhere(at, need.peak)  # no node online would ever start it again
        time.sleep(at.settings.heartbeat)  # a node alone with it would take it back at once
        _give_back(at, f"needs {_described(need)}, more than this node's {_budget(ledger)}")
    wait = ADMIT_WAIT * at.settings.lost_after
    deadline = min(time.monotonic() + wait, began + START_BUDGET / 2)
    while True:
        with ledger.locked():
            why = ledger.why_not(need, memory.available() if need.mem else None)
        if why is None:
            break
        if time.monotonic() >= deadline:
            _give_back(at, f"needs {_described(need)} and waited in vain: {why}")
        time.sleep(ADMIT_POLL)
    try:
        yield Share(ledger, key, need)
    finally:
        ledger.release()


def _described(need: Request) -> str:
    slots = f", {need.threads} slots" if need.threads > 1 else ""
    return f"{human(need.mem)}{slots}" if need.mem else f"{need.threads} slots"


def _budget(ledger: Ledger) -> str:
    return f"{human(ledger.budget)} and {ledger.slots} slots"


def _give_back(at: Attempt, why: str) -> NoReturn:
    """Back to the queue, unclaimed: another node may take it now."""
    log.warning("command %s of batch %s given back unclaimed: %s", at.task_id, at.batch_id, why)
    at.store.owe(at.batch_id, at.task_id)  # paid by the republish, or by a reaper if lost
    at.republish(front=False)
    raise Ignore()
