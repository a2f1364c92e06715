"""Batch verbs: submit, run, status, batches, failures, report, retry, cancel."""

from __future__ import annotations

import json
import sys
from typing import Any

import click
from rich.console import Group

from tbss_queue import api
from tbss_queue.autoalloc import pilot_notes
from tbss_queue.cli.app import (
    broker_options,
    cli,
    cwd_option,
    done_if_exists_option,
    err,
    json_option,
    out,
    read_broker_options,
    time_limit_option,
    wait_option,
)
from tbss_queue.cli.fsl import print_matrix
from tbss_queue.config import Settings
from tbss_queue.errors import EXIT_FAILED, EXIT_OK, ConfigError
from tbss_queue.models import Batch, BatchStatus
from tbss_queue.paths import PathMap
from tbss_queue.sizes import parse_size
from tbss_queue.views.progress import (
    LiveProgress,
    StagingProgress,
    batches_table,
    failures_text,
    left_watching,
    notes,
    plural,
    run_ended_line,
    status_table,
    submitted_line,
    summary_line,
)
from tbss_queue.views.progress import watch as watch_status


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
@done_if_exists_option
@click.option(
    "--path-map",
    multiple=True,
    metavar="FROM=TO",
    help="Rewrite path prefix FROM to TO in the commands and their directory (the workers "
    "mount the study elsewhere). Repeatable.",
)
@click.option(
    "--mem",
    metavar="SIZE",
    help="Memory each command needs (2G, 300M): a node starts it only when it has that "
    "free [default: 2G for fsl_reg lines, else none].",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    help="Threads each command runs: it takes that many slots of its node, with "
    "OMP_NUM_THREADS and the like set.",
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
    mem: str | None,
    threads: int | None,
    wait: bool,
    as_json: bool,
    settings: Settings,
) -> None:
    """Queue every command of FILE as one batch (again: resume it).

    Submitting the same file again queues only what is new, failed or cancelled.

    Example: tbss-queue submit FA/.commands --wait
    """
    with StagingProgress(err) as progress:
        batch = api.submit(
            file,
            cwd=cwd,
            time_limit=time_limit,
            retries=retries,
            done_if_exists=done_if_exists,
            path_map=PathMap.parse(path_map),
            mem=parse_size(mem, "--mem") if mem else None,
            threads=threads,
            settings=settings,
            on_progress=progress,
        )
    for warning in batch.warnings:
        err.print(f"warning: {warning}", highlight=False)
    if as_json and not wait:
        click.echo(json.dumps(batch.to_dict()))
    else:
        err.print(f"{submitted_line(batch)} (broker {settings.display_broker})", highlight=False)
        if not as_json:  # the id on stdout, also with --wait: B=$(tbss-queue submit --wait ...)
            click.echo(batch.id)
    if wait:
        sys.exit(_wait_and_report(batch.id, settings, as_json))


def _wait_and_report(batch_id: str, settings: Settings, as_json: bool) -> int:
    """Progress until the batch ends; Ctrl-C leaves the batch running and exits 0."""
    live = LiveProgress(err)
    try:
        with live as update:
            final = api.wait(batch_id, settings=settings, on_update=update, on_outage=live.outage)
    except KeyboardInterrupt:
        err.print(left_watching(batch_id, live.last), highlight=False)
        return EXIT_OK
    if as_json:
        click.echo(json.dumps(final.to_dict()))
    else:
        _print_final(final, settings)
    return EXIT_OK if final.ok else EXIT_FAILED


def _print_final(final: Any, settings: Settings) -> None:
    err.print(summary_line(final), highlight=False)
    if final.failed:
        err.print(failures_text(api.failures(final.batch, settings=settings)), highlight=False)


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
@done_if_exists_option
@click.option(
    "--report",
    "report_to",
    type=click.Path(dir_okay=False, writable=True),
    help="Also write the batch's HTML report here when it ends (as `tbss-queue report -o`).",
)
@json_option
@broker_options
def run(
    file: str,
    cwd: str | None,
    concurrency: int | None,
    time_limit: float | None,
    done_if_exists: str | None,
    report_to: str | None,
    as_json: bool,
    settings: Settings,
) -> None:
    """Run FILE to the end on this machine: private Redis, local workers, live progress.

    With no --broker / TBSS_QUEUE_BROKER, a private redis-server is started (data kept in
    CWD/.tbss-queue/, so running again after Ctrl-C resumes). With a broker, the file is
    submitted there and waited for; nothing is started.

    Example: tbss-queue run FA/.commands -c 8
    """
    from tbss_queue.local import run as run_local

    sent: list[Batch] = []

    def on_submitted(batch: Batch) -> None:  # only with a broker: say where the batch went
        err.print(
            f"a broker is configured (--broker / TBSS_QUEUE_BROKER): batch sent to "
            f"{settings.display_broker}, run by its workers; nothing starts on this machine"
            + (" (-c is ignored)" if concurrency else ""),
            highlight=False,
        )
        err.print(submitted_line(batch), highlight=False)
        sent.append(batch)

    live = LiveProgress(err)
    try:
        with live as update:
            result = run_local(
                file,
                cwd=cwd,
                concurrency=concurrency,
                time_limit=time_limit,
                done_if_exists=done_if_exists,
                settings=settings,
                on_update=update,
                on_outage=live.outage,
                on_submitted=on_submitted,
                report=report_to,
            )
    except KeyboardInterrupt:
        if not sent:  # the local batch stops with its workers: main says how to resume
            raise
        err.print(left_watching(sent[0].id, live.last), highlight=False)
        sys.exit(EXIT_OK)
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
        if result.matrix is not None:  # a tbss_2_reg -n study: which subjects, not 100 lines
            for line in result.matrix.summary:
                err.print(line, highlight=False)
            err.print("every failure: tbss-queue failures (in this directory)", highlight=False)
        elif result.failures:
            err.print(failures_text(result.failures), highlight=False)
        if result.report:
            err.print(f"wrote {result.report}", highlight=False)
        err.print(run_ended_line(result), highlight=False)
    sys.exit(EXIT_OK if final.ok else EXIT_FAILED)


@cli.command()
@click.argument("batch", required=False)
@click.option("--watch", is_flag=True, help="Refresh every few seconds until Ctrl-C.")
@click.option(
    "--matrix",
    "show_matrix",
    is_flag=True,
    help="Also the subject matrix of a tbss_2_reg -n study: every pair's state and cost.",
)
@json_option
@read_broker_options
def status(
    batch: str | None, watch: bool, show_matrix: bool, as_json: bool, settings: Settings
) -> None:
    """Counts, throughput, ETA, requeues and worker health of BATCH (default: the latest).

    With --watch and no BATCH, the dashboard follows the latest batch as new ones come.

    Example: tbss-queue status --watch
    """
    current = api.status(batch, settings=settings)
    once = show_matrix and (as_json or not watch)  # --watch reads it anew for every frame
    subjects = api.matrix(current.batch, settings=settings) if once else None
    if as_json:
        extra = {"matrix": subjects.to_dict() if subjects else None} if show_matrix else {}
        click.echo(json.dumps({**current.to_dict(), **extra}))
        return
    if watch:
        from tbss_queue.fsl.matrix_views import matrix_view

        def subjects_now(s: BatchStatus) -> Group:
            return matrix_view(api.matrix(s.batch, settings=settings))

        last = watch_status(
            lambda on_outage: api.status_riding_out(batch, settings=settings, on_outage=on_outage),
            out,
            extra=subjects_now if show_matrix else None,
        )
        err.print(left_watching((last or current).batch, last or current), highlight=False)
        return
    for warning in current.warnings:
        err.print(f"warning: {warning}", highlight=False)
    out.print(status_table(current))
    for note in notes(current, pilot_notes(api.autoalloc_state(settings=settings))):
        out.print(note, highlight=False)
    if current.failed:
        out.print(failures_text(api.failures(current.batch, settings=settings)), highlight=False)
    if show_matrix:
        print_matrix(subjects)


@cli.command()
@json_option
@read_broker_options
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
        return
    out.print(batches_table(items))


@cli.command()
@click.argument("batch", required=False)
@click.option(
    "--write",
    "write_to",
    type=click.Path(dir_okay=False, writable=True),
    help="Also write the failed commands as a new commands file.",
)
@json_option
@read_broker_options
def failures(batch: str | None, write_to: str | None, as_json: bool, settings: Settings) -> None:
    """List the failed commands of BATCH with cause, exit code, node and stderr.

    Example: tbss-queue failures 1a2b3c4d --write FA/.commands.failed
    """
    records = api.failures(batch, settings=settings)
    if write_to:
        api.write_commands(records, write_to)
        err.print(f"wrote {plural(len(records), 'failed command')} to {write_to}", highlight=False)
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in records]))
    elif records:
        out.print(failures_text(records), highlight=False)
    else:
        err.print("no failed commands", highlight=False)


@cli.command()
@click.argument("batch", required=False)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, writable=True),
    help="Write the HTML report here [default: report-BATCH.html].",
)
@click.option(
    "--joblog",
    type=click.Path(dir_okay=False, writable=True),
    help="Write a GNU parallel --joblog of BATCH here instead (also the HTML with -o).",
)
@json_option
@read_broker_options
def report(
    batch: str | None, output: str | None, joblog: str | None, as_json: bool, settings: Settings
) -> None:
    """Write one self-contained HTML report of BATCH: summary, throughput, a timeline of every
    command per worker slot, durations and failures (with --json: the same data, no file).

    Example: tbss-queue report 1a2b3c4d -o report.html
    """
    if joblog:
        rows = api.joblog(batch, joblog, settings=settings)
        err.print(f"wrote {joblog} ({rows} commands)", highlight=False)
        if not output and not as_json:
            return
    if as_json:
        click.echo(json.dumps(api.report(batch, settings=settings)))
        return
    target = output or f"report-{api.status(batch, settings=settings).batch}.html"
    data = api.report(batch, path=target, settings=settings, timeline=False)
    err.print(f"wrote {target} ({plural(data['summary']['total'], 'command')})", highlight=False)


@cli.command()
@click.argument("batch", required=False)
@wait_option
@broker_options
def retry(batch: str | None, wait: bool, settings: Settings) -> None:
    """Queue the failed (and cancelled) commands of BATCH again, exactly those.

    Example: tbss-queue retry 1a2b3c4d --wait
    """
    again = api.retry(batch, settings=settings)
    err.print(f"batch {again.id}: {plural(again.queued, 'command')} queued again", highlight=False)
    if wait:
        sys.exit(_wait_and_report(again.id, settings, False))


@cli.command()
@click.argument("batch", required=False)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation (needs BATCH).")
@broker_options
def cancel(batch: str | None, yes: bool, settings: Settings) -> None:
    """Drop the queued commands of BATCH and kill its running ones (with their children).

    Asks first, naming the batch (the latest one when BATCH is not given); without a terminal
    it needs --yes and BATCH.

    Example: tbss-queue cancel 1a2b3c4d --yes
    """
    if batch is not None and (after := api.held_until(batch, settings=settings)):
        if not yes and not click.confirm(
            f"cancel batch {batch}, held until {', '.join(after)} end: none of it will run?",
            default=False,
            err=True,
        ):
            return
        err.print(summary_line(api.cancel(batch, settings=settings)), highlight=False)
        return
    target = api.status(batch, settings=settings)
    if yes and batch is None:
        raise ConfigError(
            f"cancel --yes: name the batch (the latest is {target.batch}: "
            f"tbss-queue cancel {target.batch} --yes)"
        )
    if not yes:
        if not sys.stdin.isatty():
            raise ConfigError(
                f"cancel asks before it kills anything and there is no terminal to ask on: "
                f"pass the batch and --yes (tbss-queue cancel {target.batch} --yes)"
            )
        latest = " (the latest batch)" if batch is None else ""
        question = (
            f"cancel batch {target.batch}{latest}, {target.path}: drop "
            f"{target.queued} queued and kill {target.running} running?"
        )
        try:
            agreed = click.confirm(question, default=False, err=True)
        except click.Abort:
            agreed = False
        if not agreed:
            err.print(
                f"not cancelled; batch {target.batch} continues (tbss-queue status {target.batch})",
                highlight=False,
            )
            return
    final = api.cancel(target.batch, settings=settings)
    err.print(summary_line(final), highlight=False)


@cli.command()
@click.argument("batch")
@broker_options
def forget(batch: str, settings: Settings) -> None:
    """Drop every record of an ended BATCH from Redis now.

    Ended batches are kept TBSS_QUEUE_KEEP seconds (default 7 days), then expire on their own.
    The study's files are untouched: resubmitting still skips done fsl_reg pairs.

    Example: tbss-queue forget 1a2b3c4d
    """
    removed = api.forget(batch, settings=settings)
    err.print(f"batch {batch}: forgotten ({removed} Redis keys removed)", highlight=False)
