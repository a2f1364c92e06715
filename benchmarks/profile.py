"""Where one command's time goes in tbss-queue: a hand-run profile of a worker node.

    pip install -e '.[bench]'                 # py-spy
    python -m benchmarks.profile              # 1 node x 2 slots, 2,000 `true` (about 1 min)
    python -m benchmarks.profile --commands 300 --out /tmp/prof   # to try it
    python -m benchmarks.profile --again /tmp/prof              # the summary again, other --top

On a redis-server of its own, it starts one `tbss-queue worker` (1 node x `--slots`, as
`benchmarks.run`'s overhead workload does), warms it (every pool process has run a command and
started its guard), then runs three batches of `--commands` distinct `true` lines:

1. unprofiled: wall ms per command per slot, and the CPU each process spent per command
   (psutil): the worker's main process, its pool processes, the commands they ran (`true`,
   and any wrapper that starts it, as the pool processes reaped them), the guards,
   redis-server, and this process (submit and the status polls);
2. under `py-spy record --subprocesses --idle` (every sample, waiting included: wall time),
   for the pool processes' wall time per command by stage of an attempt;
3. under `py-spy record --subprocesses` (samples py-spy does not judge idle: CPU time, and
   some waiting in socket calls), for the top frames per process kind (main, pool process,
   guard) by self time, and tbss_queue's by total time, in ms per command.

It writes py-spy's raw profiles (collapsed stacks; speedscope.app and flamegraph.pl read them),
`meta.json` and `summary.txt` to `--out`. Frames are named `file:function`, the file as py-spy
shortens it (from the package down); a sample's process kind is read from py-spy's chain of
process frames (the worker, a pool process under it, a guard under that). Every process it
starts is stopped on the way out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

from .run import machine
from .systems import TbssQueue, fresh_redis, redis_client

KINDS = ("main", "pool process", "guard")

STAGES: list[tuple[str, tuple[str, ...]]] = [
    # (stage, markers `file:function`: see marks()); a sample goes to the stage of the deepest
    # marked frame on its stack, so nested stages (spawn inside run) are told apart. Names of
    # both layouts: tasks.py before issue 23, execution/{attempt,lease,record}.py after it
    ("message checked (check_fields)", ("fields.py:check_fields", "attempt.py:checked")),
    (
        "store and connection per task",
        ("batches.py:BatchStore.__init__", "store.py:Store.__init__", "broker.py:connect"),
    ),
    ("claim (claim.lua)", ("tasks.py:_claim", "lease.py:claimed", "lease.py:claim")),
    ("replication wait after claim/record", (":replicated",)),
    ("attempt number and line (attempt_of)", (":attempt_of",)),
    ("working directory opened", (":opened_workdir", ":workdir_fault")),
    ("program admitted (policy, locate)", (":admit", ":locate", ":local_fsl_tool")),
    ("done marker", (":done_marker", ":judge_done", ":remove_stale")),
    (
        "lease still ours? (before start, its renewal apart)",
        ("tasks.py:_go_on_if_still_ours", "lease.py:go_on_if_still_ours"),
    ),
    (
        "attempt log files opened",
        (":open_attempt_logs", ":open_logs", ":log_stem", ":log_names", "attempt.py:_log_files"),
    ),
    ("nudge watch (cancel listener)", ("nudges.py:watching",)),
    ("guard started/told", ("runner.py:_guard", "runner.py:_Guard.")),
    ("spawn (runner._spawn: Popen)", ("runner.py:_spawn",)),
    ("command running, exit awaited", ("runner.py:_exit_watch",)),
    (
        "process group killed, strays",
        ("runner.py:kill_process_group", "runner.py:kill_strays", "runner.py:_end_tree"),
    ),
    ("children listed", ("runner.py:_children",)),
    ("output tails read", ("runner.py:_tail",)),
    ("lease renewed (renew.lua)", ("tasks.py:Lease.renew", "lease.py:Lease.renew")),
    ("record (finish.lua)", ("tasks.py:record_end", "record.py:record_end")),
    ("outcome logged", ("tasks.py:_log_outcome", "record.py:log_outcome")),
    ("SIGTERM handler in/out (Interrupts)", ("tasks.py:Interrupts.", "interrupts.py:Interrupts.")),
]
"""Stages of an attempt in tasks.execute, in order, by the functions that do them."""

IDLE_LEAVES = ("select", "poll", "wait", "read", "recv", "_recv", "readinto", "accept", "sleep")


@dataclass(frozen=True)
class Sample:
    pid: int
    kind: str  # main, pool process, guard, other
    frames: tuple[str, ...]  # root first, each `file:function`
    count: int

    @property
    def main_thread(self) -> bool:
        """Sampled in the thread that runs the program (the pool's task loop, the consumer's
        event loop), not in a background thread (heartbeats, reaper, cancel listener); a stack
        torn by non-blocking sampling has neither root and counts as neither."""
        return bool(self.frames) and self.frames[0].endswith(":_run_module_as_main")


_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*)\)$")


def frame_key(frame: str) -> str:
    """`func (file)` or `func (file:line)`, as py-spy writes it, to `file:func`."""
    m = _FRAME.match(frame)
    if not m:
        return frame
    file = re.sub(r":\d+$", "", m["file"])
    return f"{file}:{m['func']}"


def parse_raw(text: str) -> list[Sample]:
    """py-spy's raw format: one line per distinct stack, `f1;f2;... COUNT`, root first. With
    --subprocesses the stack starts with a frame per process, from the one attached to down to
    the one sampled: `process PID:"cmd";process CHILD:"cmd";...`."""
    samples = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        chain = []
        while frames and (m := re.match(r'process (\d+):"(.*)"$', frames[0])):
            chain.append((int(m[1]), m[2]))
            frames = frames[1:]
        pid, cmd = chain[-1] if chain else (0, "")
        kind = {1: "main", 2: "pool process"}.get(len(chain), "other")
        if cmd.endswith("guard.py"):
            kind = "guard"
        samples.append(Sample(pid, kind, tuple(frame_key(f) for f in frames), int(count)))
    return samples


def ours(frame: str) -> bool:
    return frame.startswith("tbss_queue/")


def in_task(frames: Sequence[str]) -> bool:
    """Whether a tbss_queue frame is on the stack below Celery's call of the task (whatever
    the task's functions are named)."""
    called = [i for i, f in enumerate(frames) if f.startswith("celery/app/trace.py:")]
    return bool(called) and any(ours(f) for f in frames[called[-1] :])


def marks(frame: str, marker: str) -> bool:
    """Whether `file:qualname` is the marker's function, or a method or local function of it:
    the marker `tasks.py:record_end` marks `tbss_queue/tasks.py:_execute.<locals>.record_end`,
    `runner.py:_Guard.` every method of _Guard, `:attempt_of` that function in any file."""
    file, _, name = frame.rpartition(":")
    want_file, _, want = marker.rpartition(":")
    if want_file and file.rsplit("/", 1)[-1] != want_file:
        return False
    if want.endswith("."):
        return name.startswith(want) or f".{want}" in name
    parts = name.split(".")
    return name == want or name.startswith(f"{want}.") or want in parts


def stage_of(frames: Sequence[str]) -> str:
    """The stage of the deepest marked frame; else where in Celery the process was."""
    for frame in reversed(frames):
        for stage, markers in STAGES:
            if any(marks(frame, m) for m in markers):
                return stage
    if in_task(frames):
        return OTHER
    leaf = frames[-1].rsplit(":", 1)[-1] if frames else ""
    if leaf.rsplit(".", 1)[-1] in IDLE_LEAVES:
        return IDLE
    return "Celery/billiard around the task: protocol, tracing, result"


IDLE = "waiting for the next task"
OTHER = "other, inside the task (below)"


def top(samples: Sequence[Sample], by: str, n: int) -> list[tuple[str, int]]:
    """Frames by self samples (the leaf) or total samples (anywhere on the stack, once; only
    tbss_queue's frames, which are what can be cut, less the entry points: those on 95% of
    the stacks or more)."""
    counts: Counter[str] = Counter()
    for s in samples:
        if not s.frames:
            continue
        if by == "self":
            counts[s.frames[-1]] += s.count
        else:
            for f in set(s.frames):
                if ours(f):
                    counts[f] += s.count
    if by != "self":
        everywhere = 0.95 * sum(s.count for s in samples)
        counts = Counter({f: c for f, c in counts.items() if c < everywhere})
    return counts.most_common(n)


def summarise(samples: Sequence[Sample], rate: float, commands: int, n: int) -> str:
    """Per process kind: top frames by self time, and tbss_queue's by total time, in ms per
    command."""

    def ms(count: int) -> float:
        return 1000 * count / rate / commands

    out = []
    for kind in KINDS:
        mine = [s for s in samples if s.kind == kind]
        if not mine:
            continue
        total = sum(s.count for s in mine)
        procs = len({s.pid for s in mine})
        out.append(f"\n[{kind}] {procs} process(es), {total} samples = {ms(total):.3f} ms/command")
        for by, what in (("self", "any frame, by self"), ("total", "tbss_queue, by total")):
            out.append(f"  top {n}, {what} time (ms per command, % of this kind's samples):")
            for frame, count in top(mine, by, n):
                out.append(f"    {ms(count):7.3f}  {100 * count / total:5.1f}%  {frame}")
    return "\n".join(out)


def stages(samples: Sequence[Sample], rate: float, commands: int, busy_wall: float, n: int) -> str:
    """The pool processes' main threads by stage of an attempt, in ms per command (wall time:
    --idle samples). `busy_wall` is the run's wall time times the slots: what the pool
    processes had while the batch ran; the sampling also covers seconds before and after it,
    so the wait for the next task is what the stages leave of `busy_wall`."""
    by_stage: Counter[str] = Counter()
    inside: Counter[str] = Counter()
    for s in samples:
        if s.kind == "pool process" and s.main_thread:
            stage = stage_of(s.frames)
            by_stage[stage] += s.count
            if stage == OTHER:
                deepest = next((f for f in reversed(s.frames) if ours(f)), "?")
                inside[deepest] += s.count

    def ms(count: float) -> float:
        return 1000 * count / rate / commands

    if not by_stage:
        return "  (no samples of a pool process)"
    order = [name for name, _ in STAGES]
    rest = sorted(k for k in by_stage if k not in order and k != IDLE)
    lines = []
    worked = 0.0
    for name in [*order, *rest]:
        if by_stage[name]:
            worked += ms(by_stage[name])
            lines.append(f"  {ms(by_stage[name]):7.3f}  {name}")
    per_command = 1000 * busy_wall / commands
    lines.append(f"  {per_command - worked:7.3f}  {IDLE} (the run's wall x slots, less the above)")
    lines.append(f"  {per_command:7.3f}  the run's wall x slots / commands")
    if inside:
        lines.append(f"  '{OTHER}' by deepest tbss_queue frame (top {n}):")
        for frame, count in inside.most_common(n):
            lines.append(f"    {ms(count):7.3f}  {frame}")
    return "\n".join(lines)


def process_kinds(worker_pid: int) -> dict[int, str]:
    """The worker's main process, its pool processes and their guards, by pid."""
    kinds = {worker_pid: "main"}
    main = psutil.Process(worker_pid)
    for child in main.children():
        kinds[child.pid] = "pool process"
        for grandchild in child.children():
            with_guard = any(a.endswith("guard.py") for a in grandchild.cmdline())
            if with_guard:
                kinds[grandchild.pid] = "guard"
    return kinds


def cpu_seconds(pid: int, *, children: bool = False) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.children_user + t.children_system if children else t.user + t.system


def cpu_by_kind(kinds: dict[int, str], redis_pid: int) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for pid, kind in kinds.items():
        try:
            out[kind] += cpu_seconds(pid)
            if kind == "pool process":
                out["commands run (reaped by the pool processes)"] += cpu_seconds(
                    pid, children=True
                )
        except psutil.NoSuchProcess:
            pass
    out["redis-server"] = cpu_seconds(redis_pid)
    out["this process (submit, status polls)"] = cpu_seconds(os.getpid())
    return dict(out)


def versions() -> str:
    names = ["celery", "kombu", "billiard", "redis", "hiredis", "py-spy"]
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(found)


def py_spy() -> str:
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(exe).exists():
        raise SystemExit("py-spy not found: pip install -e '.[bench]'")
    return exe


def profiled(
    system: TbssQueue, lines: Sequence[str], out: Path, rate: int, idle: bool
) -> tuple[float, int]:
    """Run `lines` under py-spy attached to the worker and its subprocesses; the wall time and
    py-spy's exit status. Sampling does not block the processes (--nonblocking)."""
    cmd = [py_spy(), "record", "--pid", str(system.pids[0]), "--subprocesses", "--nonblocking"]
    cmd += ["--rate", str(rate), "--format", "raw", "--nolineno", "-o", str(out)]
    if idle:
        cmd.append("--idle")
    with open(out.with_suffix(".log"), "wb") as log:
        spy = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        time.sleep(2)  # attached to the main process and found its pool processes
        wall = system.run(lines)
        time.sleep(0.5)
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
        code = spy.wait(timeout=120)
    return wall, code


def measure(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Run the three batches; write the raw profiles; what the summary needs besides them."""
    n = args.commands
    workdir = Path(tempfile.mkdtemp(prefix="tbssq-profile-work-"))
    server = fresh_redis(workdir)
    system = TbssQueue(workdir, server)
    meta: dict[str, Any] = {"commands": n, "slots": args.slots, "rate": args.rate, "took": {}}
    try:
        system.start(1, args.slots)
        # warm: every pool process has run commands and started its guard
        system.run([f"true warm {i}" for i in range(4 * args.slots)])
        kinds = process_kinds(system.pids[0])
        assert server.proc is not None
        info = redis_client(server).info("server")
        head = [
            f"tbss-queue per-command profile, {time.strftime('%Y-%m-%d %H:%M %Z')}",
            f"machine: {machine()}",
            f"versions: {versions()}, redis-server {info['redis_version']}",
            f"workload: {n} distinct `true` lines on 1 node x {args.slots} slots, worker warm",
        ]
        # 1. unprofiled: wall and CPU per command by process
        before = cpu_by_kind(kinds, server.proc.pid)
        wall = system.run([f"true m{i}" for i in range(n)])
        after = cpu_by_kind(kinds, server.proc.pid)
        head.append(
            f"\nunprofiled: {wall:.2f} s wall, {1000 * wall * args.slots / n:.2f} ms per command "
            f"per slot; CPU per command (ms) by process:"
        )
        total_cpu = 0.0
        for what in after:
            used = 1000 * (after[what] - before.get(what, 0.0)) / n
            total_cpu += used
            head.append(f"  {used:7.3f}  {what}")
        head.append(
            f"  {total_cpu:7.3f}  all ({os.cpu_count()} cores: at most "
            f"{1000 * wall * (os.cpu_count() or 1) / n:.2f} ms of CPU per command were there)"
        )
        meta["head"] = head
        # 2. and 3. under py-spy
        for label, idle, prefix in (("wall", True, "w"), ("cpu", False, "c")):
            lines = [f"true {prefix}{i}" for i in range(n)]
            took, code = profiled(system, lines, out / f"{label}.raw.txt", args.rate, idle)
            meta["took"][label] = took
            meta[f"py-spy exit {label}"] = code
    finally:
        system.stop()
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return meta


def summary(out: Path, n_top: int) -> str:
    """summary.txt, from meta.json and the raw profiles in `out`."""
    meta = json.loads((out / "meta.json").read_text())
    n, slots, rate = meta["commands"], meta["slots"], meta["rate"]
    report = list(meta["head"])
    for label, what in (
        ("wall", "every sample, waiting included (py-spy --idle): WALL time"),
        ("cpu", "samples py-spy judged not idle: CPU time, and some waits on sockets"),
    ):
        raw = out / f"{label}.raw.txt"
        samples = parse_raw(raw.read_text()) if raw.exists() else []
        took = meta["took"][label]
        report.append(
            f"\n=== profile {label}: {what}; {took:.2f} s under py-spy "
            f"({1000 * took * slots / n:.2f} ms/cmd/slot), "
            f"{sum(s.count for s in samples)} samples at {rate}/s, raw: {raw}"
        )
        if label == "wall":
            report.append(
                "pool processes' main threads: wall ms per command, by stage of an attempt:"
            )
            report.append(stages(samples, rate, n, took * slots, n_top))
        else:
            report.append(summarise(samples, rate, n, n_top))
    return "\n".join(report) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", type=int, default=2000)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", type=Path, help="directory (default: a new one in /tmp)")
    parser.add_argument("--again", type=Path, help="summarise this earlier --out; run nothing")
    args = parser.parse_args()
    if args.again:
        out = args.again
    else:
        out = args.out or Path(tempfile.mkdtemp(prefix="tbssq-profile-"))
        out.mkdir(parents=True, exist_ok=True)
        meta = measure(args, out)
        (out / "meta.json").write_text(json.dumps(meta, indent=1))
    text = summary(out, args.top)
    (out / "summary.txt").write_text(text)
    print(text)
    print(f"written: {out}/summary.txt, meta.json, wall.raw.txt, cpu.raw.txt", file=sys.stderr)


if __name__ == "__main__":
    main()
