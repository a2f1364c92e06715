"""The `autoalloc` verb: the manager that submits Slurm pilot jobs as work arrives."""

from __future__ import annotations

import logging

import click

from tbss_queue.cli.app import broker_options, cli, policy_options
from tbss_queue.config import Settings
from tbss_queue.slurm import DEFAULT_MEM_PER_CPU


def _env(name: str) -> str:
    return f"TBSS_QUEUE_AUTOALLOC_{name}"


@cli.command()
@click.option(
    "--partition",
    "partitions",
    multiple=True,
    envvar=_env("PARTITION"),
    metavar="NAME",
    help="Slurm partition to keep pilots in; repeatable, filled in order "
    f"[env {_env('PARTITION')}, space-separated; default: Slurm's default partition].",
)
@click.option(
    "--max-pilots",
    default=4,
    show_default=True,
    type=click.IntRange(min=1),
    envvar=_env("MAX_PILOTS"),
    help="Pilot jobs pending or running at most, per partition.",
)
@click.option(
    "--backlog",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    envvar=_env("BACKLOG"),
    help="Pilot jobs pending (waiting for Slurm) at most, per partition.",
)
@click.option(
    "--time",
    "walltime",
    required=True,
    metavar="HH:MM:SS",
    envvar=_env("TIME"),
    help="Each pilot's wall time.",
)
@click.option(
    "--expected",
    default="10m",
    show_default=True,
    metavar="DURATION",
    envvar=_env("EXPECTED"),
    help="How long one command takes at most (as slurm-script's).",
)
@click.option(
    "--idle",
    default="5m",
    show_default=True,
    metavar="DURATION",
    envvar=_env("IDLE"),
    help="A pilot whose worker has had no command this long ends.",
)
@click.option(
    "--nodes", default=1, show_default=True, type=click.IntRange(min=1), help="Nodes per pilot."
)
@click.option(
    "--cpus-per-node",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    envvar=_env("CPUS_PER_NODE"),
    help="CPUs per node = commands each pilot's worker runs at once.",
)
@click.option(
    "--mem-per-cpu",
    default=DEFAULT_MEM_PER_CPU,
    show_default=True,
    metavar="SIZE",
    help="Memory per CPU, i.e. per running command.",
)
@click.option(
    "--job-name",
    default="tbss-queue-auto",
    show_default=True,
    help="Slurm job name of the pilots: how the manager finds its own.",
)
@click.option(
    "--interval",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    envvar=_env("INTERVAL"),
    help="Seconds between looks at the queue and Slurm.",
)
@click.option(
    "--retry-after",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Seconds before a partition's next sbatch after a failure; doubled at each failure.",
)
@click.option(
    "--max-backoff",
    default=1800.0,
    show_default=True,
    type=click.FloatRange(min=1),
    help="Longest wait after sbatch failures, seconds.",
)
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False),
    help="Where sbatch runs: the pilots' logs go there [default: here].",
)
@policy_options
@broker_options
def autoalloc(
    partitions: tuple[str, ...],
    max_pilots: int,
    backlog: int,
    walltime: str,
    expected: str,
    idle: str,
    nodes: int,
    cpus_per_node: int,
    mem_per_cpu: str,
    job_name: str,
    interval: float,
    retry_after: float,
    max_backoff: float,
    directory: str | None,
    allow: tuple[str, ...],
    allow_file: str | None,
    allow_any: bool,
    root: tuple[str, ...],
    max_time_limit: float | None,
    settings: Settings,
) -> None:
    """Keep enough Slurm pilot jobs pending or running for the queued commands, and none
    while nothing waits: run it on the head node (worker/tbss-queue-autoalloc.service).

    Example: tbss-queue autoalloc --partition compute --time 12:00:00 --cpus-per-node 16
    """
    from tbss_queue.autoalloc import AutoallocOptions, Manager, directory_or_cwd
    from tbss_queue.slurm import PilotJob, policy_argv
    from tbss_queue.worker import parse_duration

    options = AutoallocOptions(
        pilot=PilotJob(
            nodes=nodes,
            time=walltime,
            cpus_per_node=cpus_per_node,
            expected=int(parse_duration(expected, "--expected")),
            mem_per_cpu=mem_per_cpu,
            job_name=job_name,
            worker_args=policy_argv(allow, allow_file, allow_any, root, max_time_limit),
            idle=int(parse_duration(idle, "--idle")),
        ),
        partitions=tuple(p for arg in partitions for p in arg.split()) or ("",),
        max_pilots=max_pilots,
        backlog=backlog,
        interval=interval,
        retry_after=retry_after,
        max_backoff=max_backoff,
        directory=directory_or_cwd(directory),
    )
    # the manager's log: what it submitted, how each pilot ended, why sbatch failed; timed
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    manager_log = logging.getLogger("tbss_queue.autoalloc")
    manager_log.addHandler(handler)
    manager_log.setLevel(logging.INFO)
    manager_log.propagate = False
    Manager(settings, options).run()
