"""The guard of one pool process's commands: kills them, grandchildren included, when their
owner can no longer do it.

When a pool process (or the whole worker) is SIGKILLed, nothing in it runs again to kill its
command's children and grandchildren (fnirt under the fsl_reg script), which would go on
writing a pair's outputs while another node reruns it; and a pool process that is frozen (a
debugger, a blocked write, swap) can't kill its command when its lease runs out. The guard is
a separate, tiny process (stdlib only, started with `python -S -I`) in its own session. It
kills a command's process group, and every process carrying the command's environment tag
(those that left the group with setsid), when its lease runs out (by CLOCK_BOOTTIME, which
counts a suspended machine too) or when its stdin pipe closes (the pool process is gone,
however it died).

What the guard knows of the command lies in one `Slot` of memory the two processes share (a
memfd): the pool process writes it before the spawn (the tag: a command whose owner dies
before it learns its process group is found by its tag), after it (the group), at every lease
renewal and at the end, with no system call and no wake-up of the guard; the guard reads it
every CHECK_EVERY seconds, and at once when the pipe closes. A replacement guard reads the
same slot, so it knows the running command from its first look.
"""

from __future__ import annotations

import mmap
import os
import select
import signal
import struct
import sys
import time

TAG_VAR = "TBSS_QUEUE_ATTEMPT"
"""The environment variable a command and everything it starts inherit: its lease token."""

CHECK_EVERY = 0.25
"""Seconds between the guard's looks at the lease of the command it guards."""


def uptime() -> float:
    """A clock every process of the machine shares, counting while it is suspended."""
    try:
        return time.clock_gettime(time.CLOCK_BOOTTIME)
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return time.monotonic()


class Slot:
    """The command a pool process runs, as its guard sees it: process group (0 until it is
    known), tag, and the lease's end (CLOCK_BOOTTIME seconds; 0 for no lease). A sequence
    number, odd while the owner writes, lets the guard read a consistent copy (a seqlock)."""

    LAYOUT = struct.Struct("<Qqd64s")
    SIZE = LAYOUT.size

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.mem = mmap.mmap(fd, self.SIZE)

    @classmethod
    def create(cls) -> Slot:
        fd = os.memfd_create("tbss-queue-guard", os.MFD_CLOEXEC)
        os.ftruncate(fd, cls.SIZE)
        return cls(fd)

    def write(self, pgid: int, tag: str, until: float) -> None:
        seq = self.LAYOUT.unpack_from(self.mem)[0]
        struct.pack_into("<Q", self.mem, 0, seq + 1)  # odd: being written
        self.LAYOUT.pack_into(self.mem, 0, seq + 1, pgid, until, tag.encode())
        struct.pack_into("<Q", self.mem, 0, seq + 2)

    def clear(self) -> None:
        self.write(0, "", 0.0)

    def read(self) -> tuple[int, int, str, float]:
        """(sequence, group, tag, until) as last written whole."""
        while True:
            seq, pgid, until, raw = self.LAYOUT.unpack_from(self.mem)
            if seq % 2 == 0 and struct.unpack_from("<Q", self.mem)[0] == seq:
                return seq, pgid, raw.rstrip(b"\0").decode(), until
            time.sleep(0.001)


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


def kill_all(pgid: int, tag: str) -> None:
    """SIGKILL the group (if known) and every process tagged `tag`, until none is left (or 3
    rounds)."""
    for _ in range(3):
        if pgid > 0:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        pids = tagged({tag}) if tag and os.path.isdir("/proc") else []
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
    slot = Slot(int(sys.argv[1]))
    acted = -1  # the sequence number of the slot's state already acted on
    while True:
        ready, _, _ = select.select([0], [], [], CHECK_EVERY)
        if ready and not os.read(0, 4096):
            break
        seq, pgid, tag, until = slot.read()
        if (pgid or tag) and until and uptime() > until and seq != acted:
            kill_all(pgid, tag)  # its lease ran out and its owner did not act
            acted = seq
    _, pgid, tag, _ = slot.read()
    if pgid or tag:
        kill_all(pgid, tag)


if __name__ == "__main__":
    main()
