"""fsl_reg lines are judged by their outputs, not fsl_reg's exit code (it exits 0 on failure)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from tbss_queue import api
from tbss_queue.config import Settings

from .conftest import Worker, write_commands

FAKE_FSL_REG = f"""#!{sys.executable}
# A stand-in for fsl_reg IN REF OUT ...: succeeds unless OUT is listed in ./fail, in which case
# it behaves like fsl_reg after a failed fnirt: exit 0, no warp, the .msf left empty. Counts runs.
import os, sys
out = sys.argv[3]
open("runs", "a").write(out + "\\n")
if os.path.exists("fail") and out in open("fail").read().split():
    open(out + "_warp.msf", "w").close()
    sys.exit(0)
open(out + ".mat", "w").write("1 0 0 0\\n")
open(out + "_warp.nii.gz", "wb").write(b"warp")
open(out + "_warp.msf", "w").write("0.5 0.25\\n")
"""


def fa_dir(tmp_path: Path) -> tuple[Path, str]:
    fa = tmp_path / "FA"
    (tmp_path / "fsl" / "bin").mkdir(parents=True)
    fa.mkdir()
    tool = tmp_path / "fsl" / "bin" / "fsl_reg"
    tool.write_text(FAKE_FSL_REG)
    tool.chmod(0o755)
    return fa, str(tool)


def test_exit_0_without_a_valid_msf_is_a_missing_output_failure(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker]
) -> None:
    fa, tool = fa_dir(tmp_path)
    (fa / "fail").write_text("b_to_a\n")
    workers("w1")
    cmds = write_commands(
        fa / ".commands", [f"{tool} a b a_to_b -e -FA", f"{tool} b a b_to_a -e -FA"]
    )
    final = api.wait(api.submit(cmds, settings=settings).id, settings=settings, timeout=60)
    assert (final.succeeded, final.failed) == (1, 1)
    [failed] = api.failures(settings=settings)
    assert failed.cause == "missing output" and failed.exit_code == 0
    assert "b_to_a_warp.msf" in failed.message


def test_done_pairs_are_skipped_placeholders_are_not_and_stale_outputs_are_removed(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker]
) -> None:
    fa, tool = fa_dir(tmp_path)
    # a_to_b done; b_to_a: tbss_2_reg's empty placeholder; c_to_a: an old warp from a failure
    (fa / "a_to_b_warp.msf").write_text("0.1 0.05\n")
    (fa / "a_to_b_warp.nii.gz").write_bytes(b"done")
    (fa / "b_to_a_warp.msf").write_text("")
    (fa / "c_to_a_warp.nii.gz").write_bytes(b"stale")
    (fa / "c_to_a.log").write_text("old log")
    cmds = write_commands(
        fa / ".commands",
        [f"{tool} a b a_to_b -e -FA", f"{tool} b a b_to_a -e -FA", f"{tool} c a c_to_a -e -FA"],
    )
    batch = api.submit(cmds, settings=settings)
    # Then the done pair counts as skipped at submit; the placeholder one is queued
    assert (batch.queued, batch.skipped) == (2, 1)
    workers("w1")
    final = api.wait(batch.id, settings=settings, timeout=60)
    assert (final.succeeded, final.skipped, final.failed) == (2, 1, 0)
    assert sorted((fa / "runs").read_text().split()) == ["b_to_a", "c_to_a"]
    # the stale warp and log were removed before the rerun, then rewritten by it
    assert (fa / "c_to_a_warp.nii.gz").read_bytes() == b"warp"
    assert not (fa / "c_to_a.log").exists()


def test_done_if_exists_marks_other_commands_done(tmp_path: Path, settings: Settings) -> None:
    (tmp_path / "x.out").write_text("result")
    (tmp_path / "y.out").write_text("")  # empty: not done
    cmds = write_commands(tmp_path / "c", ["touch x", "touch y", "touch z"])
    batch = api.submit(cmds, done_if_exists="{last}.out", settings=settings)
    assert (batch.queued, batch.skipped) == (2, 1)


def test_a_pair_done_after_submit_is_recorded_skipped_by_the_worker_and_the_batch_ends(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker]
) -> None:
    # Given a queued pair whose outputs appear before a worker takes it (a run interrupted just
    # after fsl_reg wrote them, or another tool ran the pair)
    fa, tool = fa_dir(tmp_path)
    cmds = write_commands(
        fa / ".commands", [f"{tool} a b a_to_b -e -FA", f"{tool} b a b_to_a -e -FA"]
    )
    batch = api.submit(cmds, settings=settings)
    assert (batch.queued, batch.skipped) == (2, 0)
    (fa / "a_to_b_warp.msf").write_text("0.1 0.05\n")
    (fa / "a_to_b_warp.nii.gz").write_bytes(b"done")
    # When a worker runs the batch
    workers("w1")
    final = api.wait(batch.id, settings=settings, timeout=60)
    # Then that pair is not run again but recorded skipped, with the reason, and the batch ends
    assert (final.succeeded, final.skipped, final.failed, final.running) == (1, 1, 0, 0)
    assert (fa / "runs").read_text().split() == ["b_to_a"]
    [skipped] = api.tasks(batch.id, state="skipped", settings=settings)
    assert "already done" in skipped.message and skipped.node
    assert (skipped.line, skipped.attempt) == (1, 1)
    # and the report's timeline shows only what ran
    timeline = api.report(batch.id, settings=settings)["timeline"]
    assert [entry["line"] for entry in timeline] == [2]


def test_an_error_of_the_worker_fails_the_attempt_at_once_naming_the_file(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker]
) -> None:
    # Given a pair whose stale warp the worker cannot remove (a directory of that name)
    fa, tool = fa_dir(tmp_path)
    (fa / "b_to_a_warp.nii.gz").mkdir()
    cmds = write_commands(
        fa / ".commands", [f"{tool} a b a_to_b -e -FA", f"{tool} b a b_to_a -e -FA"]
    )
    workers("w1")
    batch = api.submit(cmds, settings=settings)
    final = api.wait(batch.id, settings=settings, timeout=60)
    # Then that one command fails once, saying what and where, and the batch ends: it is not
    # left claimed until its lease lapses, nor taken back as if its node had died
    assert (final.succeeded, final.failed, final.running, final.requeued) == (1, 1, 0, 0)
    [failed] = api.failures(batch.id, settings=settings)
    assert failed.cause == "worker error" and (failed.line, failed.attempt) == (2, 1)
    assert "b_to_a_warp.nii.gz" in failed.message and "IsADirectoryError" in failed.message
    assert (fa / "runs").read_text().split() == ["a_to_b"]
