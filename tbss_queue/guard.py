"""The guard of one pool process's commands: kills them, grandchildren included, if it dies.

A command leads its own process group, and its direct child gets a parent-death signal; but
when a pool process (or the whole worker) is SIGKILLed, nothing in it runs again to kill the
command's children and grandchildren (fnirt under the fsl_reg script), which would go on writing
a pair's outputs while another node reruns it. The guard is a separate, tiny process (stdlib
only, started with `python -S -I`) in its own session: the pool process tells it, on a pipe,
each command it starts and ends. When that pipe closes (the pool process is gone, however it
died), the guard kills every process group it was told of, and every process whose environment
carries a live command's tag (those that left the group with setsid), then exits.

Protocol, one line each: `+ PGID TAG` a command started, `- PGID` it ended.
"""

from __future__ import annotations

import os
import signal
import sys

TAG_VAR = "TBSS_QUEUE_ATTEMPT"
"""The environment variable a command and everything it starts inherit: its lease token."""


def tagged(tags: set[str]) -> list[int]:
    """Pids of live processes whose environment carries one of `tags` (this user's only)."""
    wanted = {f"{TAG_VAR}={t}".encode() for t in tags}
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = set(f.read().split(b"\0"))
        except OSError:
            continue
        if env & wanted:
            found.append(int(entry))
    return found


def kill_all(groups: dict[int, str]) -> None:
    """SIGKILL every group and every tagged process, until none is left (or 3 rounds)."""
    for _ in range(3):
        for pgid in groups:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        pids = tagged(set(groups.values())) if os.path.isdir("/proc") else []
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if not pids:
            return


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only the pipe's end tells this one to act
    groups: dict[int, str] = {}
    for line in sys.stdin.buffer:
        words = line.split()
        if len(words) == 3 and words[0] == b"+":
            groups[int(words[1])] = words[2].decode()
        elif len(words) == 2 and words[0] == b"-":
            groups.pop(int(words[1]), None)
    kill_all(groups)


if __name__ == "__main__":
    main()
