"""The guard of one pool process's commands: kills them, grandchildren included, when their
owner can no longer do it.

A command leads its own process group, and its direct child gets a parent-death signal; but
when a pool process (or the whole worker) is SIGKILLed, nothing in it runs again to kill the
command's children and grandchildren (fnirt under the fsl_reg script), which would go on writing
a pair's outputs while another node reruns it; and a pool process that is frozen (a debugger, a
blocked write, swap) can't kill its command when its lease runs out. The guard is a separate,
tiny process (stdlib only, started with `python -S -I`) in its own session: the pool process
tells it, on a pipe, each command it starts, each lease renewal and each end. It kills a
command's process group, and every process carrying that command's environment tag (those that
left the group with setsid), when its lease runs out (by CLOCK_BOOTTIME, which counts a
suspended machine too) or when the pipe closes (the pool process is gone, however it died).

Protocol, one line each: `t TAG UNTIL` a command is about to start (if its owner dies before
the next line, the guard finds it by its tag), `+ PGID TAG UNTIL` it started, `v PGID UNTIL`
its lease now runs until UNTIL, `- PGID` it ended. UNTIL is CLOCK_BOOTTIME seconds, 0 for no
lease. The first line is what lets the pool process start its commands without a
parent-death signal (no preexec_fn, no exec wrapper: Python's fast vfork path).
"""

from __future__ import annotations

import os
import select
import signal
import time

TAG_VAR = "TBSS_QUEUE_ATTEMPT"
"""The environment variable a command and everything it starts inherit: its lease token."""

CHECK_EVERY = 0.25
"""Seconds between the guard's looks at the leases it holds."""


def uptime() -> float:
    """A clock every process of the machine shares, counting while it is suspended."""
    try:
        return time.clock_gettime(time.CLOCK_BOOTTIME)
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return time.monotonic()


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


def kill_all(groups: dict[int, str], tags: set[str] | None = None) -> None:
    """SIGKILL every group and every process tagged with their tags or `tags`, until none is
    left (or 3 rounds)."""
    for _ in range(3):
        for pgid in groups:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        wanted = set(groups.values()) | (tags or set())
        pids = tagged(wanted) if os.path.isdir("/proc") else []
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
    groups: dict[int, tuple[str, float]] = {}
    starting: dict[str, float] = {}  # tag -> until: announced, not yet started
    pending = b""
    while True:
        ready, _, _ = select.select([0], [], [], CHECK_EVERY)
        if ready:
            data = os.read(0, 65536)
            if not data:
                break
            *lines, pending = (pending + data).split(b"\n")
            for line in lines:
                words = line.split()
                if len(words) == 3 and words[0] == b"t":
                    starting[words[1].decode()] = float(words[2])
                elif len(words) == 4 and words[0] == b"+":
                    groups[int(words[1])] = (words[2].decode(), float(words[3]))
                    starting.pop(words[2].decode(), None)
                elif len(words) == 3 and words[0] == b"v" and int(words[1]) in groups:
                    groups[int(words[1])] = (groups[int(words[1])][0], float(words[2]))
                elif len(words) == 2 and words[0] == b"-":
                    groups.pop(int(words[1]), None)
        now = uptime()
        for pgid, (tag, until) in list(groups.items()):
            if until and now > until:
                kill_all({pgid: tag})  # its lease ran out and its owner did not act
                del groups[pgid]
        for tag, until in list(starting.items()):
            if until and now > until:
                kill_all({}, {tag})
                del starting[tag]
    kill_all({pgid: tag for pgid, (tag, _) in groups.items()}, set(starting))


if __name__ == "__main__":
    main()
