"""Verbs that know FSL's TBSS: demo, plan, best-target."""

from __future__ import annotations

import json

import click
from rich.table import Table

from tbss_queue import api
from tbss_queue.cli.app import (
    broker_options,
    cli,
    err,
    json_option,
    out,
)
from tbss_queue.config import Settings
from tbss_queue.fsl.matrix import SubjectMatrix


def print_matrix(matrix: SubjectMatrix | None) -> None:
    """`status --matrix`: the grid, then the summary naming broken subjects."""
    from tbss_queue.fsl.matrix_views import NO_MATRIX, matrix_view

    if matrix is None:
        err.print(NO_MATRIX, highlight=False)
        return
    out.print(matrix_view(matrix), highlight=False)


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
@click.option(
    "--broken",
    multiple=True,
    metavar="SUBJECT",
    help="Cut this subject's FA image short (e.g. sub05): its registrations fail.",
)
def demo(directory: str, subjects: int, seconds: float, seed: int, broken: tuple[str, ...]) -> None:
    """Write a synthetic TBSS study: DIRECTORY/FA/*_FA.nii.gz and FA/.commands.

    The commands are exactly what `tbss_2_reg -n` writes. Without FSL installed they call a
    stand-in fsl_reg (DIRECTORY/fsl-standin/bin/fsl_reg) that is NOT FSL: it does a real,
    CPU-bound least-squares affine fit for about --seconds and writes the files fsl_reg writes
    (OUT.mat, OUT_warp.nii.gz, OUT_warp.msf), so every later step can be tried.

    Example: tbss-queue demo demo-study --subjects 6 && tbss-queue run demo-study/FA/.commands
    """
    from tbss_queue.fsl.demo import make_demo

    study = make_demo(directory, subjects=subjects, seconds=seconds, seed=seed, broken=broken)
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

    Subjects as tbss_2_reg's `imglob *_FA.*` lists them (dotfiles out). A pair is left out
    when done as the worker judges it (two numbers in its _warp.msf and the warp there);
    every pair written gets tbss_2_reg's empty _warp.msf placeholder.

    Example: tbss-queue plan . -n --submit
    """
    from tbss_queue.fsl.plan import plan

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

    Writes FA/all.msf (an old one is removed first). Refuses (exit 1, naming the files) when
    any registration has no score or no warp: FSL's own script would count a missing score as a
    perfect 0 and favour the target with holes, and its applywarp needs the warps.

    Example: tbss-queue best-target FA
    """
    from tbss_queue.fsl.plan import best_target

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
