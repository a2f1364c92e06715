"""A memory-bound workload (issue 24): commands that each hold 400 MB for 5 s, on one node of 8
slots in a memory cgroup of 1.5 GiB, where 3 fit at once. Compared: tbss-queue with its
admission (`submit --mem 400M`), tbss-queue as it was before issue 24 (`--before`: a checkout of
that code; slots only, an OOM kill booked as the command's failure), and GNU parallel
`--memfree 400M -j 8`. Reported: OOM kills (the cgroup's count), makespan, failed commands.

Run by hand, as root on a machine with a memory cgroup (v1 or v2), not in CI:

    python -m benchmarks.memory --before /path/to/checkout-before-issue-24
    python -m benchmarks.memory --quick          # 12 commands, to try it

Each command is tests/bin/job.py --alloc 368 --sleep 5: 368 MiB touched, 16 MiB at a time, its
tree ~382 MiB = 400 MB, as `--mem 400M` (MiB) declares it with 5% to spare; `--alloc 400`
makes the request 3.5% short of the truth.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tbss_queue import api
from tbss_queue.config import Settings
from tbss_queue.execution.memory import Cgroup

from .systems import REPO, fresh_redis

JOB = REPO / "tests" / "bin" / "job.py"
LIMIT = 1536 * 2**20
SLOTS = 8


ALLOC = 368
"""MiB each command touches: with Python's own ~14 MiB, its tree holds ~382 MiB = 400 MB."""


def _line(i: int, done: Path, alloc: int = ALLOC) -> str:
    return shlex.join(
        [
            sys.executable,
            str(JOB),
            str(i),
            "--alloc",
            str(alloc),
            "--sleep",
            "5",
            "--log",
            str(done),
        ]
    )


class Group:
    """A child memory cgroup of this process's own, limited to LIMIT."""

    def __init__(self) -> None:
        parent = Cgroup.of()
        if parent is None:
            sys.exit("no memory cgroup to make a child of (needs root and cgroup v1 or v2)")
        self.path = parent.path / f"tbssq-bench-{os.getpid()}-{time.monotonic_ns()}"
        if parent.v2:
            (parent.path / "cgroup.subtree_control").write_text("+memory")
        self.path.mkdir()
        name = "memory.max" if parent.v2 else "memory.limit_in_bytes"
        (self.path / name).write_text(str(LIMIT))
        self.group = Cgroup(self.path, parent.v2)

    def wrap(self) -> list[str]:
        return ["sh", "-c", f'echo $$ > {self.path / "cgroup.procs"} && exec "$@"', "sh"]

    def remove(self) -> None:
        for _ in range(100):
            pids = (self.path / "cgroup.procs").read_text().split()
            if not pids:
                break
            subprocess.run(["kill", "-9", *pids], check=False, stderr=subprocess.DEVNULL)
            time.sleep(0.05)
        for _ in range(100):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.05)


def tbss_queue(
    workdir: Path, n: int, mem: str | None, before: Path | None, alloc: int
) -> dict[str, float]:
    """One worker node of SLOTS slots in a fresh cgroup; the batch from submit to its end."""
    server = fresh_redis(workdir)
    group = Group()
    done = workdir / f"done-{mem}-{bool(before)}"
    env = {
        **os.environ,
        "TBSS_QUEUE_BROKER": server.url,
        "PYTHONPATH": str(before or REPO),
        "PYTHONUNBUFFERED": "1",
    }
    log = workdir / f"worker-{mem}-{bool(before)}.log"
    args = [*group.wrap(), sys.executable, "-m", "tbss_queue", "worker", "--allow-any"]
    args += ["--concurrency", str(SLOTS), "--name", "bench"]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(args, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=workdir)
    try:
        while b" ready." not in log.read_bytes():
            time.sleep(0.1)
        cmds = workdir / f"cmds-{mem}-{bool(before)}"
        cmds.write_text("".join(_line(i, done, alloc) + "\n" for i in range(n)))
        settings = Settings.resolve(env={}, broker=server.url)
        kills = group.group.oom_kills() or 0
        t0 = time.monotonic()
        mem_bytes = 400 * 2**20 if mem else None
        batch = api.submit(cmds, mem=mem_bytes, settings=settings)
        final = api.wait(batch.id, settings=settings, timeout=1800)
        return {
            "oom_kills": (group.group.oom_kills() or 0) - kills,
            "makespan": time.monotonic() - t0,
            "failed": final.failed,
            "done": len(done.read_text().split()) if done.exists() else 0,
            "requeued": final.requeued,
        }
    finally:
        proc.kill()
        proc.wait()
        group.remove()
        server.stop()


def parallel(workdir: Path, n: int, alloc: int) -> dict[str, float]:
    """GNU parallel in the same cgroup: --memfree reads the machine's free memory."""
    group = Group()
    done = workdir / "done-parallel"
    cmds = workdir / "cmds-parallel"
    cmds.write_text("".join(_line(i, done, alloc) + "\n" for i in range(n)))
    kills = group.group.oom_kills() or 0
    t0 = time.monotonic()
    try:
        run = subprocess.run(
            [*group.wrap(), "parallel", "-j", str(SLOTS), "--memfree", "400M", "::::", str(cmds)],
            check=False,
            capture_output=True,
        )
        return {
            "oom_kills": (group.group.oom_kills() or 0) - kills,
            "makespan": time.monotonic() - t0,
            "failed": min(run.returncode, n) if run.returncode < 101 else n,
            "done": len(done.read_text().split()) if done.exists() else 0,
        }
    finally:
        group.remove()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="12 commands instead of 60")
    ap.add_argument("--before", type=Path, help="a checkout of tbss-queue before issue 24")
    ap.add_argument("--alloc", type=int, default=ALLOC, help="MiB each command touches")
    a = ap.parse_args()
    n = 12 if a.quick else 60
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="tbssq-mem-") as tmp:
        workdir = Path(tmp)
        rows["tbss-queue, --mem 400M (admission)"] = tbss_queue(workdir, n, "400M", None, a.alloc)
        if a.before is not None:
            rows["tbss-queue before issue 24 (slots only)"] = tbss_queue(
                workdir, n, None, a.before, a.alloc
            )
        rows["GNU parallel --memfree 400M -j 8"] = parallel(workdir, n, a.alloc)
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"{n} commands x {a.alloc} MiB touched x 5 s, {SLOTS} slots, 1.5 GiB cgroup; {when}")
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, {platform.platform()}")
    print("\n| system | OOM kills | makespan | failed | completed |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['oom_kills']:.0f} | {r['makespan']:.1f} s | {r['failed']:.0f} "
            f"| {r['done']:.0f} of {n} |"
        )


if __name__ == "__main__":
    main()
