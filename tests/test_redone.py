"""Success is judged by outputs, both ways: a command recorded as succeeded whose outputs are
gone is queued again at the next submit, and the submit says how many and why (issue 29,
point 10)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tbss_queue import api
from tbss_queue.config import Settings

from .conftest import Worker, settings_env, tbss_queue, write_commands
from .test_fsl_outputs import fa_dir


def test_a_pair_whose_outputs_were_deleted_is_queued_again_and_the_submit_says_so(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], run_tag: str
) -> None:
    # Given four fsl_reg pairs that succeeded
    fa, tool = fa_dir(tmp_path)
    pairs = ["a b a_to_b", "b a b_to_a", "a c a_to_c", "c a c_to_a"]
    cmds = write_commands(fa / ".commands", [f"{tool} {p} -e -FA" for p in pairs])
    env = settings_env(settings, run_tag)
    workers("w1")
    first = tbss_queue("submit", str(cmds), env=env)
    assert first.returncode == 0, first.stderr
    batch = first.stdout.strip()
    assert api.wait(batch, settings=settings, timeout=60).succeeded == 4
    # When the outputs of two pairs are deleted and the file is submitted again
    for out in ("a_to_b", "c_to_a"):
        for path in fa.glob(f"{out}*"):
            path.unlink()
    again = tbss_queue("submit", str(cmds), env=env)
    # Then the submit queues those two again and says why
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == batch
    assert f"batch {batch}: 2 commands queued, 2 already queued, running or done" in again.stderr
    assert "2 queued again: their outputs are gone (lines 1, 4)" in again.stderr, again.stderr
    # and they run again, to the same four successes
    final = api.wait(batch, settings=settings, timeout=60)
    assert (final.succeeded, final.failed, final.queued) == (4, 0, 0)
    runs = (fa / "runs").read_text().split()
    assert sorted(runs) == sorted(["a_to_b", "b_to_a", "a_to_c", "c_to_a", "a_to_b", "c_to_a"])
    assert (fa / "a_to_b_warp.msf").read_text().strip() == "0.5 0.25"
    # and a third submit, with every output there, queues nothing
    third = tbss_queue("submit", str(cmds), env=env)
    assert f"batch {batch}: 0 commands queued, 4 already" in third.stderr, third.stderr
    assert "queued again" not in third.stderr


def test_a_done_if_exists_output_deleted_is_queued_again(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], run_tag: str
) -> None:
    # Given two commands judged by --done-if-exists, both succeeded
    (tmp_path / "src").write_text("result")
    cmds = write_commands(tmp_path / "c", ["cp src x.out", "cp src y.out"])
    env = settings_env(settings, run_tag)
    workers("w1")
    first = tbss_queue("submit", str(cmds), "--done-if-exists", "{last}", env=env)
    assert first.returncode == 0, first.stderr
    batch = first.stdout.strip()
    assert api.wait(batch, settings=settings, timeout=60).succeeded == 2
    # When one output is deleted and the file submitted again
    (tmp_path / "y.out").unlink()
    again = tbss_queue("submit", str(cmds), "--done-if-exists", "{last}", env=env)
    # Then that one command is queued again, and said so
    assert "1 queued again: its output is gone (line 2)" in again.stderr, again.stderr
    final = api.wait(batch, settings=settings, timeout=60)
    assert (final.succeeded, final.queued) == (2, 0)
    assert (tmp_path / "y.out").exists()
