"""Pilot jobs: an sbatch script that starts one worker per node for the whole allocation."""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources import files
from string import Template

from tbss_queue.errors import ConfigError

START_MARGIN = 60
"""Seconds allowed for a node to start Python and connect before it takes commands."""

DEFAULT_EXPECTED = 600
"""Seconds one command may take (`slurm-script --expected`, default 10m): a registration
takes 3-5 minutes, so a node stops taking commands this long before its wall time ends."""

DEFAULT_MEM_PER_CPU = "2G"
"""Memory Slurm reserves per CPU, i.e. per running command. FNIRT on 1 mm FA is quoted at 1-2 GB
(doctor.GB_PER_FNIRT): the upper figure, because a pilot job that outgrows its allocation is
killed by Slurm's memory enforcement as a whole, every node's running commands with it, while
0.5 GB more per CPU costs nothing on most nodes."""

PILOT_GRACE = 0
"""The pilot's `worker --grace`. A pilot job is only ever signalled by `scancel` or its wall time,
and Slurm then SIGKILLs everything KillWait seconds later (30 s by default): far too soon for a
registration to finish, so the worker hands its commands back at once instead of waiting."""


def parse_walltime(text: str) -> int:
    """Slurm's [D-]HH:MM:SS, HH:MM:SS, MM:SS or minutes -> seconds."""
    m = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(?:(\d+):)?(\d+)", text.strip())
    if m is None:
        raise ConfigError(f"--time {text!r}: expected HH:MM:SS or D-HH:MM:SS")
    days, a, b, c = (int(g) if g else None for g in m.groups())
    if a is None and b is None:  # plain minutes
        return (days or 0) * 86400 + int(c or 0) * 60
    parts = [p for p in (a, b, c) if p is not None]
    while len(parts) < 3:
        parts.insert(0, 0)
    h, mi, s = parts
    return (days or 0) * 86400 + h * 3600 + mi * 60 + s


def check_memory(text: str) -> str:
    """Slurm's memory size: a whole number with an optional K, M, G or T (megabytes if none)."""
    if re.fullmatch(r"[1-9]\d*[KMGT]?", text.strip(), re.IGNORECASE) is None:
        raise ConfigError(f"--mem-per-cpu {text!r}: expected a size like 2G or 1500M")
    return text.strip().upper()


def policy_argv(
    allow: Sequence[str] = (),
    allow_file: str | None = None,
    allow_any: bool = False,
    roots: Sequence[str] = (),
    max_time_limit: float | None = None,
) -> tuple[str, ...]:
    """The worker's policy options as its command line in a pilot script. Paths are made
    absolute: the job runs in whatever directory sbatch was called from."""
    args: list[str] = []
    for entry in allow:
        args += ["--allow", entry]
    if allow_file:
        args += ["--allow-file", os.path.abspath(allow_file)]
    if allow_any:
        args.append("--allow-any")
    for root in roots:
        args += ["--root", os.path.abspath(root)]
    if max_time_limit is not None:
        args += ["--max-time-limit", f"{max_time_limit:g}"]
    return tuple(args)


@dataclass(frozen=True)
class PilotJob:
    nodes: int
    time: str
    cpus_per_node: int = 1
    partition: str | None = None
    expected: int = DEFAULT_EXPECTED  # seconds one command may take to finish after the last start
    mem_per_cpu: str = DEFAULT_MEM_PER_CPU
    job_name: str = "tbss-queue"
    worker_args: tuple[str, ...] = ()
    """Further options of each pilot's worker (`policy_argv`): what it agrees to run."""
    idle: int | None = None
    """Seconds without work after which each node's worker exits (`worker --idle-exit`), so
    that the job ends and frees its allocation once the queue has emptied."""

    @property
    def stop_after(self) -> int:
        """Seconds from the start during which the pilot takes commands."""
        return parse_walltime(self.time) - self.expected - START_MARGIN

    def render(self) -> str:
        wall = parse_walltime(self.time)
        stop_after = wall - self.expected - START_MARGIN
        if stop_after <= 0:
            default = " (the default)" if self.expected == DEFAULT_EXPECTED else ""
            raise ConfigError(
                f"--time {self.time} ({wall} s) leaves no time to work: a node stops taking "
                f"commands --expected {self.expected} s{default} plus {START_MARGIN} s of "
                f"start-up before the end. Give --time longer than "
                f"{self.expected + START_MARGIN} s, or an --expected shorter than "
                f"{max(wall - START_MARGIN, 0)} s if no command takes that long"
            )
        mem = check_memory(self.mem_per_cpu)
        args = [
            f"--nodes {self.nodes}",
            f"--time {self.time}",
            f"--cpus-per-node {self.cpus_per_node}",
        ]
        if self.partition:
            args.append(f"--partition {shlex.quote(self.partition)}")
        args += [f"--expected {self.expected}s", f"--mem-per-cpu {mem}"]
        if self.idle is not None:
            args.append(f"--idle {self.idle}s")
        policy = shlex.join(self.worker_args)
        if policy:
            args.append(policy)
        template = Template(files("tbss_queue").joinpath("templates/slurm.sbatch").read_text())
        return template.substitute(
            args=" ".join(args),
            job_name=self.job_name,
            nodes=self.nodes,
            cpus=self.cpus_per_node,
            mem=mem,
            time=self.time,
            wall=wall,
            expected=self.expected,
            margin=START_MARGIN,
            stop_after=stop_after,
            grace=PILOT_GRACE,
            idle=f" --idle-exit {self.idle}s" if self.idle is not None else "",
            drain=f"{self.expected + START_MARGIN} s",
            partition_line=f"#SBATCH --partition={self.partition}\n" if self.partition else "",
            policy=f" \\\n    {policy}" if policy else "",
        )
