"""The `tbss-queue` command: parses options, builds Settings, calls the API, renders the result.

No logic lives here; every command is a few lines over a function of `tbss_queue.api`.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import click
import redis
from rich.console import Console
from rich.table import Table

from . import api
from .config import Settings
from .errors import (
    EXIT_BROKER,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    TbssQueueError,
)
from .local import Interrupted
from .paths import PathMap
from .policy import Policy
from .progress import (
    LiveProgress,
    failures_table,
    fmt_duration,
    node_notes,
    status_table,
    summary_line,
)
from .progress import (
    watch as watch_status,
)

EPILOG = """\b
Examples:
  tbss-queue demo demo-study --subjects 6      # a synthetic study to try things on
  tbss-queue run demo-study/FA/.commands       # everything on this machine, no set-up
  tbss-queue worker --broker redis://head:6379/0     # on every machine that should work
  tbss-queue submit FA/.commands --wait        # on the machine that holds the study
  tbss-queue status --watch
"""

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


_CONNECTION_FILES = (
    (
        "tls-ca",
        False,
        "CA certificate(s) that signed Redis's certificate, for rediss:// "
        "(default: the system's CAs)",
    ),
    ("tls-cert", False, "Client certificate, when Redis asks for one"),
    ("tls-key", False, "Private key of --tls-cert"),
    ("sign-key", False, "Sign messages with this private key (Celery's auth serializer)"),
    ("sign-cert", False, "Certificate of --sign-key"),
    (
        "sign-store",
        True,
        "Directory of trusted signers' certificates; unsigned or foreign messages are refused",
    ),
)
"""Connection options naming a file or directory: (flag, is a directory, help)."""
CONNECTION_OPTIONS = (
    "broker",
    "result_backend",
    "tls_insecure",
    *(flag.replace("-", "_") for flag, _, _ in _CONNECTION_FILES),
)
"""The parameters of broker_options, handed to Settings.resolve."""


def broker_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--broker / --result-backend, declared once, resolved into Settings for the command."""

    @click.option(
        "--broker",
        envvar="TBSS_QUEUE_BROKER",
        metavar="URL",
        help="Redis URL of the queue [env TBSS_QUEUE_BROKER; default redis://localhost:6379/0].",
    )
    @click.option(
        "--result-backend",
        envvar="TBSS_QUEUE_RESULT_BACKEND",
        metavar="URL",
        help="Celery result backend [default: the broker].",
    )
    @click.option(
        "--tls-insecure",
        is_flag=True,
        default=None,
        help="Do not verify Redis's certificate (testing only) [env TBSS_QUEUE_TLS_INSECURE].",
    )
    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        given = {name: kwargs.pop(name) for name in CONNECTION_OPTIONS}
        settings = Settings.resolve(**given)
        if settings.tls_insecure:
            err.print(
                "warning: --tls-insecure: Redis's certificate is not verified", highlight=False
            )
        return f(*args, settings=settings, **kwargs)

    for flag, is_dir, text in reversed(_CONNECTION_FILES):
        env = "TBSS_QUEUE_" + flag.upper().replace("-", "_")
        wrapper = click.option(
            f"--{flag}",
            type=click.Path(file_okay=not is_dir, dir_okay=is_dir),
            help=f"{text} [env {env}].",
        )(wrapper)
    return wrapper


cwd_option = click.option(
    "--cwd",
    type=click.Path(file_okay=False),
    help="Directory the commands run in [default: the file's directory, FA/].",
)
time_limit_option = click.option(
    "--time-limit",
    type=float,
    metavar="SECONDS",
    help="Kill a command (and its children) after this long [default 6 h].",
)
wait_option = click.option(
    "--wait", is_flag=True, help="Show progress until the batch ends; exit 1 on failure."
)


def json_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(f)


@click.group(epilog=EPILOG)
@click.version_option(package_name="tbss-queue")
@click.option("-v", "--verbose", is_flag=True, help="Show tracebacks and debug logs.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """Run the registration commands of an FSL TBSS study (FA/.commands) on many machines.

    Commands go to one Redis queue; `tbss-queue worker` on every machine runs them.
    """
    ctx.obj = {"verbose": verbose}
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False))
@cwd_option
@time_limit_option
@click.option(
    "--retries",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Run a failed command again up to N times (lost workers are always retried).",
)
@click.option(
    "--done-if-exists",
    metavar="PATTERN",
    help="Skip a command when a non-empty file matches PATTERN (relative to its directory; "
    "{out} {in} {ref} {last} {0}..{N} come from the line). fsl_reg lines need none: their "
    ".msf and warp are checked.",
)
@click.option(
    "--path-map",
    multiple=True,
    metavar="FROM=TO",
    help="Rewrite path prefix FROM to TO in the commands and their directory (the workers "
    "mount the study elsewhere). Repeatable.",
)
@wait_option
@json_option
@broker_options
def submit(
    file: str,
    cwd: str | None,
    time_limit: float | None,
    retries: int,
    done_if_exists: str | None,
    path_map: tuple[str, ...],
    wait: bool,
    as_json: bool,
    settings: Settings,
) -> None:
    """Queue every command of FILE as one batch (again: resume it).

    Submitting the same file again queues only what is new, failed or cancelled.

    Example: tbss-queue submit FA/.commands --wait
    """
    batch = api.submit(
        file,
        cwd=cwd,
        time_limit=time_limit,
        retries=retries,
        done_if_exists=done_if_exists,
        path_map=PathMap.parse(path_map),
        settings=settings,
    )
    for warning in batch.warnings:
        err.print(f"warning: {warning}", highlight=False)
    if as_json and not wait:
        click.echo(json.dumps(batch.to_dict()))
    else:
        err.print(
            f"batch {batch.id}: {batch.queued} commands queued, {batch.skipped} skipped "
            f"(broker {settings.display_broker})",
            highlight=False,
        )
        if not wait:
            click.echo(batch.id)
    if wait:
        sys.exit(_wait_and_report(batch.id, settings, as_json))


def _wait_and_report(batch_id: str, settings: Settings, as_json: bool) -> int:
    with LiveProgress(err) as update:
        final = api.wait(batch_id, settings=settings, on_update=update)
    if as_json:
        click.echo(json.dumps(final.to_dict()))
    else:
        _print_final(final, settings)
    return EXIT_OK if final.ok else EXIT_FAILED


def _print_final(final: Any, settings: Settings) -> None:
    err.print(summary_line(final), highlight=False)
    if final.failed:
        err.print(failures_table(api.failures(final.batch, settings=settings)))


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False))
@cwd_option
@click.option(
    "-c",
    "--concurrency",
    type=click.IntRange(min=1),
    help="Commands run at once [default: CPU count].",
)
@time_limit_option
@json_option
@broker_options
def run(
    file: str,
    cwd: str | None,
    concurrency: int | None,
    time_limit: float | None,
    as_json: bool,
    settings: Settings,
) -> None:
    """Run FILE to the end on this machine: private Redis, local workers, live progress.

    With no --broker / TBSS_QUEUE_BROKER, a private redis-server is started (data kept in
    CWD/.tbss-queue/, so running again after Ctrl-C resumes). With a broker, the file is
    submitted there and waited for; nothing is started.

    Example: tbss-queue run FA/.commands -c 8
    """
    from .local import run as run_local

    with LiveProgress(err) as update:
        result = run_local(
            file,
            cwd=cwd,
            concurrency=concurrency,
            time_limit=time_limit,
            settings=settings,
            on_update=update,
        )
    final = result.status
    if as_json:
        click.echo(
            json.dumps(
                {
                    **final.to_dict(),
                    "wall_seconds": result.wall_seconds,
                    "failures": [r.to_dict() for r in result.failures],
                }
            )
        )
    else:
        err.print(summary_line(final), highlight=False)
        if result.failures:
            err.print(failures_table(result.failures))
        err.print(
            f"wall time {fmt_duration(result.wall_seconds)}"
            + (f"; Redis data kept in {result.run_dir}" if result.run_dir else ""),
            highlight=False,
        )
    sys.exit(EXIT_OK if final.ok else EXIT_FAILED)


@cli.command()
@click.argument("batch", required=False)
@click.option("--watch", is_flag=True, help="Refresh every few seconds until Ctrl-C.")
@json_option
@broker_options
def status(batch: str | None, watch: bool, as_json: bool, settings: Settings) -> None:
    """Counts, throughput, ETA and workers of BATCH (default: the latest).

    Example: tbss-queue status --watch
    """
    current = api.status(batch, settings=settings)
    if as_json:
        click.echo(json.dumps(current.to_dict()))
        return
    if watch:
        watch_status(lambda: api.status(current.batch, settings=settings), out)
    for warning in current.warnings:
        err.print(f"warning: {warning}", highlight=False)
    out.print(status_table(current))
    for note in node_notes(current):
        out.print(note, highlight=False)
    if current.failed:
        out.print(failures_table(api.failures(current.batch, settings=settings)))


@cli.command()
@json_option
@broker_options
def batches(as_json: bool, settings: Settings) -> None:
    """List the batches on the broker with their counts.

    Example: tbss-queue batches
    """
    items = api.list_batches(settings=settings)
    if as_json:
        click.echo(json.dumps([b.to_dict() for b in items]))
        return
    if not items:
        err.print("no batches yet")
    for b in items:
        out.print(summary_line(b), highlight=False)


@cli.command()
@click.argument("batch", required=False)
@click.option(
    "--write",
    "write_to",
    type=click.Path(dir_okay=False, writable=True),
    help="Also write the failed commands as a new commands file.",
)
@json_option
@broker_options
def failures(batch: str | None, write_to: str | None, as_json: bool, settings: Settings) -> None:
    """List the failed commands of BATCH with cause, exit code, node and stderr.

    Example: tbss-queue failures 1a2b3c4d --write FA/.commands.failed
    """
    records = api.failures(batch, settings=settings)
    if write_to:
        api.write_commands(records, write_to)
        err.print(f"wrote {len(records)} failed commands to {write_to}", highlight=False)
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in records]))
    else:
        out.print(failures_table(records))


@cli.command()
@click.argument("batch", required=False)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, writable=True),
    help="Write the HTML report here [default: report-BATCH.html].",
)
@json_option
@broker_options
def report(batch: str | None, output: str | None, as_json: bool, settings: Settings) -> None:
    """Write one self-contained HTML report of BATCH: summary, throughput, a timeline of every
    command per worker slot, durations and failures (with --json: the same data, no file).

    Example: tbss-queue report 1a2b3c4d -o report.html
    """
    if as_json:
        click.echo(json.dumps(api.report(batch, settings=settings)))
        return
    target = output or f"report-{api.status(batch, settings=settings).batch}.html"
    data = api.report(batch, path=target, settings=settings)
    err.print(f"wrote {target} ({data['summary']['total']} commands)", highlight=False)


@cli.command()
@click.argument("batch", required=False)
@wait_option
@broker_options
def retry(batch: str | None, wait: bool, settings: Settings) -> None:
    """Queue the failed (and cancelled) commands of BATCH again, exactly those.

    Example: tbss-queue retry 1a2b3c4d --wait
    """
    again = api.retry(batch, settings=settings)
    err.print(f"batch {again.id}: {again.queued} commands queued again", highlight=False)
    if wait:
        sys.exit(_wait_and_report(again.id, settings, False))


@cli.command()
@click.argument("batch", required=False)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@broker_options
def cancel(batch: str | None, yes: bool, settings: Settings) -> None:
    """Drop the queued commands of BATCH and kill its running ones (with their children).

    Example: tbss-queue cancel 1a2b3c4d --yes
    """
    if not yes and sys.stdin.isatty():
        click.confirm(f"cancel batch {batch or '(latest)'}?", abort=True)
    final = api.cancel(batch, settings=settings)
    err.print(summary_line(final), highlight=False)


@cli.command()
@click.option(
    "-c",
    "--concurrency",
    type=click.IntRange(min=1),
    help="Commands run at once on this node [default: CPU count].",
)
@click.option("-n", "--name", help="Node name (name or name@host) [default: tbss@HOSTNAME].")
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
    "--allow",
    multiple=True,
    metavar="NAME_OR_PATH",
    help="Also run this executable (default: FSL's registration tools). Repeatable.",
)
@click.option(
    "--allow-file",
    type=click.Path(dir_okay=False),
    help="A file of further --allow entries, one per line.",
)
@click.option(
    "--allow-any",
    is_flag=True,
    help="Run any command that reaches the queue (no executable check).",
)
@click.option(
    "--root",
    multiple=True,
    metavar="DIR",
    help="Only run commands whose directory lies under DIR. Repeatable; recommended.",
)
@click.option(
    "--max-time-limit",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Cap every batch's own time limit on this node.",
)
@broker_options
def worker(
    concurrency: int | None,
    name: str | None,
    loglevel: str,
    path_map: tuple[str, ...],
    grace: float,
    stop_after: str | None,
    until: str | None,
    allow: tuple[str, ...],
    allow_file: str | None,
    allow_any: bool,
    root: tuple[str, ...],
    max_time_limit: float | None,
    settings: Settings,
) -> None:
    """Run commands from the queue on this machine until stopped.

    SIGTERM: no new commands; running ones may finish for --grace seconds, then they are
    killed and handed back to the queue (not failed).

    Example: tbss-queue worker --broker redis://head:6379/0 -c 8
    """
    from .worker import WorkerOptions, run_worker, stop_after_seconds

    options = WorkerOptions(
        concurrency=concurrency,
        name=name,
        loglevel=loglevel.upper(),
        path_map=PathMap.parse(path_map),
        grace=grace,
        stop_after=stop_after_seconds(stop_after, until),
        policy=Policy.build(allow, allow_file, allow_any, root),
        max_time_limit=max_time_limit,
    )
    run_worker(settings, options)


@cli.group(invoke_without_command=True)
@json_option
@broker_options
@click.pass_context
def nodes(ctx: click.Context, as_json: bool, settings: Settings) -> None:
    """List worker nodes: online or lost, quarantined (and why), FSL version.

    Example: tbss-queue nodes
    """
    ctx.obj = settings
    if ctx.invoked_subcommand is not None:
        return
    items = api.nodes(settings=settings)
    if as_json:
        click.echo(json.dumps([n.to_dict() for n in items]))
        return
    table = Table(box=None)
    for col in ("node", "state", "last seen", "FSL", "why"):
        table.add_column(col)
    for n in items:
        state = "quarantined" if n.quarantined else ("online" if n.online else "lost")
        seen = f"{fmt_duration(max(0.0, time.time() - n.last_seen))} ago" if n.last_seen else "-"
        fsl = str(n.facts.get("fsl_version") or "-")
        table.add_row(n.node, state, seen, fsl, n.quarantined or "")
    out.print(table)


@nodes.command("resume")
@click.argument("node")
@click.pass_obj
def nodes_resume(settings: Settings, node: str) -> None:
    """Let quarantined NODE (name@host, as `nodes` lists it) take commands again.

    Example: tbss-queue nodes resume w1@studyhost
    """
    if not api.resume_node(node, settings=settings):
        raise click.UsageError(f"node {node!r} is not quarantined (see `tbss-queue nodes`)")
    err.print(f"{node}: takes commands again within one heartbeat", highlight=False)


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option(
    "--subjects",
    default=6,
    show_default=True,
    type=click.IntRange(min=2),
    help="Number of synthetic subjects (N x N registrations).",
)
@click.option(
    "--seconds",
    default=2.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="CPU time each stand-in registration takes.",
)
@click.option("--seed", default=0, show_default=True, help="Random seed of the images.")
def demo(directory: str, subjects: int, seconds: float, seed: int) -> None:
    """Write a synthetic TBSS study: DIRECTORY/FA/*_FA.nii.gz and FA/.commands.

    The commands are exactly what `tbss_2_reg -n` writes. Without FSL installed they call a
    stand-in fsl_reg (DIRECTORY/fsl-standin/bin/fsl_reg) that is NOT FSL: it does a real,
    CPU-bound least-squares affine fit for about --seconds and writes the files fsl_reg writes
    (OUT.mat, OUT_warp.nii.gz, OUT_warp.msf), so every later step can be tried.

    Example: tbss-queue demo demo-study --subjects 6 && tbss-queue run demo-study/FA/.commands
    """
    from .demo import make_demo

    study = make_demo(directory, subjects=subjects, seconds=seconds, seed=seed)
    n = len(study.subjects)
    err.print(
        f"wrote {n} synthetic FA images and {n * n} registrations to {study.commands}",
        highlight=False,
    )
    if study.standin:
        err.print(
            "note: FSL not found; the commands call a stand-in fsl_reg that is NOT FSL "
            f"({study.fsldir}/bin/fsl_reg)",
            highlight=False,
        )
    click.echo(study.commands)


@cli.command("plan")
@click.argument("study", type=click.Path(file_okay=False))
@click.option("-n", "mode", flag_value="-n", help="All-to-all: every subject to every subject.")
@click.option("-T", "mode", flag_value="-T", help="Every subject to FMRIB58_FA_1mm.")
@click.option("-t", "target", metavar="IMAGE", help="Every subject to IMAGE.")
@click.option(
    "--fsldir", envvar="FSLDIR", help="FSL's directory, written into each line [env FSLDIR]."
)
@click.option("--submit", "then_submit", is_flag=True, help="Queue the commands at once.")
@broker_options
def plan_cmd(
    study: str,
    mode: str | None,
    target: str | None,
    fsldir: str | None,
    then_submit: bool,
    settings: Settings,
) -> None:
    """Write STUDY/FA/.commands as `tbss_2_reg -n | -T | -t IMAGE` would, running nothing.

    Pairs whose _warp.msf holds a result are left out, as tbss_2_reg does (its empty
    placeholder counts as not done).

    Example: tbss-queue plan . -n --submit
    """
    from .plan import plan

    chosen = "-t" if target else mode
    if chosen is None or (target and mode):
        raise click.UsageError("give exactly one of -n, -T or -t IMAGE")
    result = plan(study, mode=chosen, target=target, fsldir=fsldir)
    err.print(
        f"{len(result.lines)} registrations written to {result.commands}; "
        f"{len(result.done)} already done",
        highlight=False,
    )
    if then_submit and result.lines:
        batch = api.submit(result.commands, settings=settings)
        err.print(f"batch {batch.id}: {batch.queued} commands queued", highlight=False)
        click.echo(batch.id)


@cli.command("best-target")
@click.argument("fa_dir", type=click.Path(file_okay=False, exists=True))
@json_option
def best_target_cmd(fa_dir: str, as_json: bool) -> None:
    """Pick the most representative subject after an -n run, as tbss_3_postreg -S does.

    Writes FA/all.msf. Refuses (exit 1, naming the files) when any registration has no score:
    FSL's own script would count it as a perfect 0 and favour the target with holes.

    Example: tbss-queue best-target FA
    """
    from .plan import best_target

    result = best_target(fa_dir)
    if result.target_exists:
        err.print(
            f"warning: {fa_dir}/target exists: tbss_3_postreg -S will use it and ignore "
            "these scores; remove it to use the best target",
            highlight=False,
        )
    if as_json:
        click.echo(
            json.dumps(
                {
                    "best": result.best,
                    "all_msf": result.all_msf,
                    "ranking": [
                        {"subject": s.subject, "mean": str(s.mean), "median": str(s.median)}
                        for s in result.ranking
                    ],
                }
            )
        )
        return
    table = Table(box=None, title=f"targets ranked (wrote {result.all_msf})", title_justify="left")
    for col in ("rank", "subject", "mean score", "median score"):
        table.add_column(col)
    for i, s in enumerate(result.ranking, 1):
        table.add_row(str(i), s.subject, str(s.mean), str(s.median))
    err.print(table)
    err.print(f"best target: {result.best}", highlight=False)
    click.echo(result.best)


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
    from .flower import FlowerOptions, run_flower

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
    "this long before the wall time ends.",
)
def slurm_script(
    nodes: int, walltime: str, cpus_per_node: int, partition: str | None, expected: str
) -> None:
    """Print an sbatch script that runs one worker per node for the allocation.

    Example: tbss-queue slurm-script --nodes 4 --time 12:00:00 --cpus-per-node 16 > pilot.sbatch
    """
    from .slurm import PilotJob
    from .worker import parse_duration

    job = PilotJob(
        nodes=nodes,
        time=walltime,
        cpus_per_node=cpus_per_node,
        partition=partition,
        expected=int(parse_duration(expected, "--expected")),
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
    from .doctor import diagnose

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


def main(argv: list[str] | None = None) -> None:
    """Entry point: map every TbssQueueError to its one-line message and exit code."""
    verbose = bool({"-v", "--verbose"} & set(argv or sys.argv))  # tracebacks only then
    try:
        cli.main(args=argv, prog_name="tbss-queue", standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt, Interrupted):
        err.print("interrupted; run the same command again to resume")
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code if exc.exit_code else EXIT_USAGE)
    except TbssQueueError as exc:
        if verbose:
            raise
        click.echo(f"tbss-queue: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except redis.RedisError as exc:  # the broker failed mid-command (it answered at first)
        if verbose:
            raise
        click.echo(f"tbss-queue: error: broker: {type(exc).__name__}: {exc}", err=True)
        sys.exit(EXIT_BROKER)
    except SystemExit:
        raise
    sys.exit(EXIT_OK)
