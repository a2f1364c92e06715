"""Finding and stopping every process a run started, grandchildren included.

Commands lead their own sessions (so a worker can kill a command's whole tree), which also
takes them out of the worker's process group. To find them all again, processes we start carry
an environment tag that their children inherit.
"""

from __future__ import annotations

import contextlib
import os

import psutil

TAG_VAR = "TBSS_QUEUE_RUN_TAG"


def tagged(tag: str) -> list[psutil.Process]:
    """Live processes (of this user) whose environment holds TBSS_QUEUE_RUN_TAG=tag."""
    found = []
    me = os.getpid()
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == me:
            continue
        with contextlib.suppress(psutil.Error, OSError):
            if proc.environ().get(TAG_VAR) == tag and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
    return found


def kill_tagged(tag: str, grace: float = 3.0) -> int:
    """SIGTERM every tagged process, SIGKILL what is left after `grace`; returns how many."""
    procs = tagged(tag)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=grace)
    return len(procs)


def children(pid: int) -> list[int]:
    """pid's children (/proc children files of each of its threads): a few reads, no scan of
    every process."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    return out
