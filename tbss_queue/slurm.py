"""Pilot jobs: an sbatch script that starts one worker per node for the whole allocation."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from importlib.resources import files
from string import Template

from .errors import ConfigError

START_MARGIN = 60
"""Seconds allowed for a node to start Python and connect before it takes commands."""


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


@dataclass(frozen=True)
class PilotJob:
    nodes: int
    time: str
    cpus_per_node: int = 1
    partition: str | None = None
    expected: int = 600  # seconds one command may take to finish after the last start
    job_name: str = "tbss-queue"
    grace: int = 120

    def render(self) -> str:
        wall = parse_walltime(self.time)
        stop_after = wall - self.expected - START_MARGIN
        if stop_after <= 0:
            raise ConfigError(
                f"--time {self.time} ({wall} s) leaves no time to work: it must exceed the "
                f"expected command duration ({self.expected} s) plus {START_MARGIN} s"
            )
        args = [
            f"--nodes {self.nodes}",
            f"--time {self.time}",
            f"--cpus-per-node {self.cpus_per_node}",
        ]
        if self.partition:
            args.append(f"--partition {shlex.quote(self.partition)}")
        args.append(f"--expected {self.expected}s")
        template = Template(files("tbss_queue").joinpath("templates/slurm.sbatch").read_text())
        return template.substitute(
            args=" ".join(args),
            job_name=self.job_name,
            nodes=self.nodes,
            cpus=self.cpus_per_node,
            time=self.time,
            wall=wall,
            expected=self.expected,
            margin=START_MARGIN,
            stop_after=stop_after,
            grace=self.grace,
            signal_at=self.grace + 30,
            drain=f"{self.expected + START_MARGIN} s",
            partition_line=f"#SBATCH --partition={self.partition}\n" if self.partition else "",
        )
