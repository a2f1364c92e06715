"""The `logs` verb: one attempt's stdout or stderr, one command away."""

from __future__ import annotations

import json
import sys

import click

from tbss_queue import api
from tbss_queue.cli.app import cli, err, json_option, read_broker_options
from tbss_queue.config import Settings
from tbss_queue.errors import EXIT_FAILED
from tbss_queue.views.logfiles import copy_to
from tbss_queue.views.visible import copy_visible, visible, visible_lines


@cli.command()
@click.argument("refs", nargs=-1, required=True, metavar="[BATCH] LINE|PAIR")
@click.option(
    "--attempt",
    type=click.IntRange(min=1),
    help="Show this attempt (1 = the first) [default: the last].",
)
@click.option("--stderr", "stderr", is_flag=True, help="Show stderr instead of stdout.")
@click.option("--path", "path_only", is_flag=True, help="Print the log file's path only.")
@click.option(
    "--raw",
    is_flag=True,
    help="The bytes as the command wrote them (default: control characters shown escaped, "
    "so that its escape sequences never reach your terminal).",
)
@json_option
@read_broker_options
def logs(
    refs: tuple[str, ...],
    attempt: int | None,
    stderr: bool,
    path_only: bool,
    raw: bool,
    as_json: bool,
    settings: Settings,
) -> None:
    """Print the stdout (or --stderr) of a command of BATCH (default: the latest batch of the
    study you are in), by its LINE in the commands file or, for fsl_reg, its PAIR
    (sub05_FA_to_sub01_FA, sub05,sub01 or sub05→sub01).

    Every attempt's output is kept in the batch's directory, in
    .tbss-queue/logs/BATCH/LINE.ATTEMPT[.IN_to_REF].out and .err (with fsl_sub's -l: where
    fsl_sub puts them). Exit 1 when there is nothing to show.

    Example: tbss-queue logs sub05_FA_to_sub01_FA --stderr
    """
    if len(refs) > 2:
        raise click.UsageError(f"expected [BATCH] LINE|PAIR, got {len(refs)} words")
    batch, command = (None, refs[0]) if len(refs) == 1 else refs
    found = api.logs(batch, command, attempt=attempt, settings=settings)
    stream = "err" if stderr else "out"
    if as_json:
        click.echo(json.dumps(found.to_dict()))
        return
    if path_only:
        click.echo(found.path(stream))
        return
    err.print(visible(found.header(stream)), highlight=False, markup=False)
    out = sys.stdout.buffer
    if found.missing is None:
        if raw:
            copy_to(found.path(stream), out)
        else:
            with open(found.path(stream), "rb") as f:
                copy_visible(f, out)
        out.flush()
        return
    tail = found.stderr_tail if stderr else found.stdout_tail
    if not (found.stdout_tail or found.stderr_tail):
        err.print(
            visible(f"tbss-queue: error: no log: {found.missing}"), highlight=False, markup=False
        )
        sys.exit(EXIT_FAILED)
    err.print(
        visible(f"warning: {found.missing}; showing the end kept in the record instead"),
        highlight=False,
        markup=False,
    )
    out.write((tail if raw else visible_lines(tail)).encode("utf-8", "replace"))
    out.flush()
