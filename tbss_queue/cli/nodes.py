"""Node and operations verbs: worker, nodes, flower, slurm-script, doctor."""

from __future__ import annotations

import json
import sys

import click
from rich.table import Table
from rich.text import Text

from tbss_queue import api
from tbss_queue.autoalloc import pilot_notes
from tbss_queue.cli.app import (
    broker_options,
    cli,
    err,
    json_option,
    out,
    policy_options,
)
from tbss_queue.config import Settings
from tbss_queue.errors import EXIT_FAILED, EXIT_OK
from tbss_queue.execution.environment import pass_env_names
from tbss_queue.execution.policy import Policy
from tbss_queue.paths import PathMap
from tbss_queue.sizes import parse_size
from tbss_queue.slurm import DEFAULT_MEM_PER_CPU
from tbss_queue.views.progress import fmt_duration
from tbss_queue.views.requests import capacity
from tbss_queue.views.visible import visible


@cli.command()
@click.option(
    "-c",
    "--concurrency",
    type=click.IntRange(min=1),
    envvar="TBSS_QUEUE_CONCURRENCY",
    help="Commands run at once on this node [env TBSS_QUEUE_CONCURRENCY; default: CPU count].",
)
@click.option("-n", "--name", help="Node name (name or name@host) [default: tbss@HOSTNAME].")
@click.option(
    "--mem",
    metavar="SIZE",
    envvar="TBSS_QUEUE_MEM",
    help="Memory this node's commands may hold together (16G, 500M) [env TBSS_QUEUE_MEM; "
    "default: the machine's, or its cgroup's limit].",
)
@click.option(
    "--loglevel",
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
)
@click.option(
    "--path-map",
    multiple=True,
    metavar="FROM=TO",
    help="Rewrite path prefix FROM to TO before running (this machine mounts the study "
    "elsewhere). Repeatable.",
)
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=600,
    show_default=True,
    help="On SIGTERM, seconds running commands may finish before they are handed back.",
)
@click.option(
    "--stop-after",
    metavar="DURATION",
    help="Take no new command after this long (90s, 10m, 2h); exit when idle.",
)
@click.option("--until", metavar="HH:MM", help="Take no new command after this time.")
@click.option(
    "--idle-exit",
    metavar="DURATION",
    help="Exit once no command has run for this long (90s, 10m); pilot jobs use it.",
)
@click.option(
    "--hours",
    metavar="HH:MM-HH:MM",
    envvar="TBSS_QUEUE_HOURS",
    help="Take commands only in these hours, local time (19:00-07:00 crosses midnight); at "
    "their end running commands finish, or are handed back after --grace "
    "[env TBSS_QUEUE_HOURS].",
)
@click.option(
    "--yield-load",
    metavar="CPUS",
    type=float,
    envvar="TBSS_QUEUE_YIELD_LOAD",
    help="Pause commands (SIGSTOP, leases kept) while processes other than this worker's use "
    "more than CPUS CPUs, measured over --load-window (not the load average); continue when "
    "they use half as much for 6 windows [env TBSS_QUEUE_YIELD_LOAD].",
)
@click.option(
    "--max-pause",
    metavar="DURATION",
    default="5m",
    show_default=True,
    help="Hand a command paused this long back to the queue (at most 5m: Celery's hard time "
    "limit).",
)
@click.option(
    "--load-window",
    metavar="SECONDS",
    type=float,
    default=10.0,
    show_default=True,
    help="Seconds over which --yield-load measures other processes, once per look.",
)
@click.option("--clock-file", hidden=True, help="Tests only: a file holding the local time.")
@click.option("--load-scope", type=int, hidden=True, help="Tests only: count this pid's tree.")
@policy_options
@click.option(
    "--pass-env",
    multiple=True,
    metavar="NAME",
    help="Pass this variable of the worker's environment on to commands (they get FSL's, "
    "PATH, HOME, the locale and TMPDIR, never tbss-queue's own). Repeatable.",
)
@broker_options
def worker(
    concurrency: int | None,
    name: str | None,
    mem: str | None,
    loglevel: str,
    path_map: tuple[str, ...],
    grace: float,
    stop_after: str | None,
    until: str | None,
    idle_exit: str | None,
    allow: tuple[str, ...],
    allow_file: str | None,
    allow_any: bool,
    root: tuple[str, ...],
    hours: str | None,
    yield_load: float | None,
    max_pause: str,
    load_window: float,
    clock_file: str | None,
    load_scope: int | None,
    pass_env: tuple[str, ...],
    max_time_limit: float | None,
    settings: Settings,
) -> None:
    """Run commands from the queue on this machine until stopped.

    SIGTERM: no new commands; running ones may finish for --grace seconds, then they are
    killed and handed back to the queue (not failed).

    Example: tbss-queue worker --broker redis://head:6379/0 -c 8
    """
    from tbss_queue.execution.owner import Hours, OwnerPolicy
    from tbss_queue.worker import WorkerOptions, parse_duration, run_worker, stop_after_seconds

    owner = OwnerPolicy(
        hours=Hours.parse(hours) if hours else None,
        yield_load=yield_load,
        max_pause=parse_duration(max_pause, "--max-pause"),
        load_window=load_window,
        clock_file=clock_file,
        load_scope=load_scope,
    ).check()

    options = WorkerOptions(
        concurrency=concurrency,
        name=name,
        loglevel=loglevel.upper(),
        path_map=PathMap.parse(path_map),
        grace=grace,
        stop_after=stop_after_seconds(stop_after, until),
        policy=Policy.build(allow, allow_file, allow_any, root, refuse_patterns=True),
        max_time_limit=max_time_limit,
        pass_env=pass_env_names(pass_env),
        idle_exit=parse_duration(idle_exit, "--idle-exit") if idle_exit else None,
        owner=owner,
        mem=parse_size(mem, "--mem") if mem else None,
    )
    run_worker(settings, options)


@cli.group(invoke_without_command=True)
@json_option
@broker_options
@click.pass_context
def nodes(ctx: click.Context, as_json: bool, settings: Settings) -> None:
    """List worker nodes: online, stopping, stopped, lost, paused or quarantined (and why),
    their last heartbeat, slots and memory budget, the commands they run now and their FSL
    version.

    Example: tbss-queue nodes
    """
    ctx.obj = settings
    if ctx.invoked_subcommand is not None:
        return
    items = api.nodes(settings=settings)
    if as_json:
        click.echo(json.dumps([n.to_dict() for n in items]))
        return
    pilots = pilot_notes(api.autoalloc_state(settings=settings))
    if not items:
        err.print("no worker has connected to this broker yet (start one: tbss-queue worker)")
        for line in pilots:
            out.print(line, highlight=False)
        return
    table = Table(box=None)
    for col in ("node", "state", "heartbeat", "capacity", "running", "FSL", "why"):
        table.add_column(col)
    for n in items:
        seen = "-" if n.heartbeat_age is None else f"{fmt_duration(n.heartbeat_age)} ago"
        fsl = str(n.facts.get("fsl_version") or "-")
        said = (n.quarantined, n.paused)
        why = "; ".join([*(s for s in said if s), *n.cannot])
        running = ", ".join(n.running) or "-"
        shown = (n.node, n.state, seen, capacity(n.facts), running, fsl, why)
        table.add_row(*(Text(visible(str(cell))) for cell in shown))
    out.print(table)
    for line in pilots:  # a pilot's node is slurmJOBID@host
        out.print(line, highlight=False)


@nodes.command("resume")
@click.argument("node")
@broker_options
def nodes_resume(node: str, settings: Settings) -> None:
    """Let quarantined NODE (name@host, as `nodes` lists it) take commands again.

    Example: tbss-queue nodes resume w1@studyhost
    """
    if not api.resume_node(node, settings=settings):
        raise click.UsageError(f"node {node!r} is not quarantined (see `tbss-queue nodes`)")
    err.print(f"{node}: takes commands again within one heartbeat", highlight=False)


@cli.command()
@click.option(
    "--address",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on; anything but loopback needs --basic-auth.",
)
@click.option("--port", default=5555, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--basic-auth",
    envvar="TBSS_QUEUE_FLOWER_AUTH",
    metavar="USER:PASSWORD",
    help="Require this login [env TBSS_QUEUE_FLOWER_AUTH].",
)
@click.option(
    "--db",
    default="flower.db",
    show_default=True,
    help="Where Flower keeps its state across restarts.",
)
@click.option("--url-prefix", help="Serve under this path (behind a reverse proxy).")
@broker_options
def flower(
    address: str,
    port: int,
    basic_auth: str | None,
    db: str,
    url_prefix: str | None,
    settings: Settings,
) -> None:
    """Start Flower (read-only) for the configured broker: workers, tasks, /metrics.

    Example: tbss-queue flower --port 5555
    """
    from tbss_queue.flower import FlowerOptions, run_flower
    from tbss_queue.ports import check_port_free

    check_port_free(address, port)
    run_flower(
        settings,
        FlowerOptions(
            address=address, port=port, basic_auth=basic_auth, db=db, url_prefix=url_prefix
        ),
    )


@cli.command("slurm-script")
@click.option("--nodes", required=True, type=click.IntRange(min=1), help="Nodes to allocate.")
@click.option("--time", "walltime", required=True, metavar="HH:MM:SS", help="Wall time.")
@click.option(
    "--cpus-per-node",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="CPUs per node = commands each node's worker runs at once.",
)
@click.option("--partition", help="Slurm partition.")
@click.option(
    "--expected",
    default="10m",
    show_default=True,
    metavar="DURATION",
    help="How long one command takes at most: the worker stops taking new ones "
    "this long (plus a minute of start-up) before the wall time ends.",
)
@click.option(
    "--mem-per-cpu",
    default=DEFAULT_MEM_PER_CPU,
    show_default=True,
    metavar="SIZE",
    help="Memory per CPU, i.e. per running command (FNIRT needs 1-2 GB).",
)
@click.option(
    "--idle",
    metavar="DURATION",
    help="End the job once its workers have had no command for this long (10m).",
)
@policy_options
def slurm_script(
    nodes: int,
    walltime: str,
    cpus_per_node: int,
    partition: str | None,
    expected: str,
    mem_per_cpu: str,
    idle: str | None,
    allow: tuple[str, ...],
    allow_file: str | None,
    allow_any: bool,
    root: tuple[str, ...],
    max_time_limit: float | None,
) -> None:
    """Print an sbatch script that runs one worker per node for the allocation, with the
    worker's policy options (--allow, --root, ...) passed to each pilot's worker.

    Example: tbss-queue slurm-script --nodes 4 --time 12:00:00 --cpus-per-node 16 > pilot.sbatch
    """
    from tbss_queue.slurm import PilotJob, policy_argv
    from tbss_queue.worker import parse_duration

    job = PilotJob(
        nodes=nodes,
        time=walltime,
        cpus_per_node=cpus_per_node,
        partition=partition,
        expected=int(parse_duration(expected, "--expected")),
        mem_per_cpu=mem_per_cpu,
        worker_args=policy_argv(allow, allow_file, allow_any, root, max_time_limit),
        idle=int(parse_duration(idle, "--idle")) if idle else None,
    )
    click.echo(job.render(), nl=False)


@cli.command()
@click.option("--study", type=click.Path(), help="The study directory workers write to.")
@json_option
@broker_options
def doctor(study: str | None, as_json: bool, settings: Settings) -> None:
    """Check this machine: broker, clock, FSL, study directory, disk, CPUs and memory.

    Exits 1 if any check fails; each failure says what to do.

    Example: tbss-queue doctor --study /data/study/FA
    """
    from tbss_queue.doctor import diagnose

    checks = diagnose(settings, study)
    if as_json:
        click.echo(json.dumps([c.to_dict() for c in checks]))
    else:
        for c in checks:
            mark = "[green]OK  [/green]" if c.ok else "[red]FAIL[/red]"
            out.print(
                f"{mark} {c.name:8} {c.detail}" + (f"\n       -> {c.fix}" if c.fix else ""),
                highlight=False,
            )
    sys.exit(EXIT_OK if all(c.ok for c in checks) else EXIT_FAILED)
