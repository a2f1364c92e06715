"""Run only what was checked: no gap between a real worker's check and its use (issue 27).

Each window between the worker's check and its action is held open deterministically: a
loopback proxy that holds the worker's one Redis request between its check and its exec, a
worker slot that stops itself (SIGSTOP) right before an unlink, a FIFO. Never a sleep.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from tbss_queue import api
from tbss_queue.config import Settings
from tbss_queue.queue.store import script_sha
from tbss_queue.redis_server import RedisServer

from .conftest import Worker, settings_env, tbss_queue, write_commands
from .faults import wait_until
from .proxy import HoldingProxy, holding
from .test_security import fsldir

BEFORE_START = rb"EVALSHA\r\n\$40\r\n" + script_sha("claim").encode()
"""The worker's claim: after every check of the node's preflight (the folder opened, the
program judged), before it touches outputs or starts the command (attempt.py)."""


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[HoldingProxy]:
    """Between a worker and Redis: Redis carries out the worker's first claim, and its reply
    is held: the worker has checked everything, and starts the command once it has it."""
    with holding(redis_server.port, BEFORE_START, reply=True) as p:
        yield p


def study_tree(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """fsl/ (a stand-in fsl_reg), study/sub/ (the --root and the command's folder), outside/."""
    fsl = fsldir(tmp_path)
    study, outside = tmp_path / "study", tmp_path / "outside"
    (study / "sub").mkdir(parents=True)
    outside.mkdir()
    return fsl, study, study / "sub", outside


def test_the_program_swapped_after_the_check_does_not_run(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], proxy: HoldingProxy
) -> None:
    # Given ./fsl_reg, a link to $FSLDIR/bin/fsl_reg, and a planted script beside it
    fsl, study, sub, outside = study_tree(tmp_path)
    (sub / "fsl_reg").symlink_to(fsl / "bin" / "fsl_reg")
    planted = study / "planted"
    planted.write_text(f"#!/bin/sh\ntouch {outside}/canary_planted\n")
    planted.chmod(0o755)
    workers(
        "w1", 1, "--root", str(study),
        env={"FSLDIR": str(fsl), "TBSS_QUEUE_BROKER": proxy.url},
    )  # fmt: skip
    batch = api.submit(write_commands(sub / "cmds", ["./fsl_reg a b pair"]), settings=settings)
    # When the link points at the planted script once the worker judged it, before its exec
    assert proxy.caught.wait(60), "the worker never claimed the command"
    (sub / "new").symlink_to(planted)
    os.replace(sub / "new", sub / "fsl_reg")
    proxy.release()
    status = api.wait(batch.id, settings=settings, timeout=60)
    # Then the file that was judged ran: FSL's fsl_reg, not the planted script
    assert not (outside / "canary_planted").exists()
    assert status.succeeded == 1, api.failures(batch.id, settings=settings)
    assert (sub / "pair_warp.msf").read_text().split() == ["0.5", "0.2"]


def test_the_folder_swapped_after_the_check_is_not_where_it_runs(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], proxy: HoldingProxy
) -> None:
    # Given a command in study/sub and a worker rooted in study/
    fsl, study, sub, outside = study_tree(tmp_path)
    workers(
        "w1", 1, "--root", str(study),
        env={"FSLDIR": str(fsl), "TBSS_QUEUE_BROKER": proxy.url},
    )  # fmt: skip
    cmds = write_commands(tmp_path / "cmds", [f"{fsl}/bin/fsl_reg a b pair"])
    batch = api.submit(cmds, cwd=sub, settings=settings)
    # When sub/ is renamed and a symlink to a folder outside the root takes its place, after
    # the worker checked the folder and before it started the command
    assert proxy.caught.wait(60), "the worker never claimed the command"
    sub.rename(study / "sub.orig")
    sub.symlink_to(outside)
    proxy.release()
    status = api.wait(batch.id, settings=settings, timeout=60)
    # Then the command ran in the folder that was checked, with its log files there, and
    # nothing was written outside
    assert list(outside.iterdir()) == []
    assert status.succeeded == 1, api.failures(batch.id, settings=settings)
    assert (study / "sub.orig" / "pair_warp.msf").exists()
    logs = study / "sub.orig" / ".tbss-queue" / "logs" / batch.id
    assert sorted(p.suffix for p in logs.iterdir()) == [".err", ".out"]


def _stopped_slot(worker: Worker) -> psutil.Process | None:
    for child in psutil.Process(worker.proc.pid).children(recursive=True):
        try:
            if child.status() == psutil.STATUS_STOPPED:
                return child
        except psutil.NoSuchProcess:
            continue
    return None


def test_stale_output_removal_never_leaves_the_folder_it_checked(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker]
) -> None:
    # Given an fsl_reg pair writing into d/, an earlier attempt's d/pair.mat, and outside the
    # root a file of the same name; the worker's slot stops itself (SIGSTOP) right before it
    # unlinks a file named pair.mat (a test hook, tests/bin/pause_before_unlink)
    fsl, study, sub, outside = study_tree(tmp_path)
    (sub / "d").mkdir()
    (sub / "d" / "pair.mat").write_text("stale")
    (outside / "pair.mat").write_text("victim: must survive")
    hook = Path(__file__).parent / "bin" / "pause_before_unlink"
    w = workers(
        "w1", 1, "--root", str(study),
        env={
            "FSLDIR": str(fsl),
            "PYTHONPATH": os.pathsep.join([str(hook), os.environ["PYTHONPATH"]]),
            "TBSS_QUEUE_TEST_PAUSE_UNLINK": "pair.mat",
        },
    )  # fmt: skip
    cmds = write_commands(sub / "cmds", [f"{fsl}/bin/fsl_reg a b d/pair"])
    batch = api.submit(cmds, settings=settings)
    # When d/ is swapped for a symlink to outside/ while the slot is stopped before the unlink
    wait_until(lambda: _stopped_slot(w) is not None, 60, "the slot to stop before its unlink")
    slot = _stopped_slot(w)
    assert slot is not None
    (sub / "d").rename(sub / "d.orig")
    (sub / "d").symlink_to(outside)
    slot.send_signal(signal.SIGCONT)
    api.wait(batch.id, settings=settings, timeout=60)
    # Then the stale file in the folder that was checked went, the one outside stayed
    assert (outside / "pair.mat").read_text() == "victim: must survive"
    assert not (sub / "d.orig" / "pair.mat").exists()


def test_a_fifo_as_a_marker_fails_its_command_and_the_slot_goes_on(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], run_tag: str
) -> None:
    # Given a FIFO planted as one pair's <out>_warp.msf, and a worker of one slot
    fsl, study, sub, _ = study_tree(tmp_path)
    os.mkfifo(sub / "pair_warp.msf")
    cmds = write_commands(
        sub / "cmds", [f"{fsl}/bin/fsl_reg a b pair", f"{fsl}/bin/fsl_reg a b other"]
    )
    workers("w1", 1, "--root", str(study), env={"FSLDIR": str(fsl)})
    # When the file is submitted (submit reads the same markers)
    try:
        res = tbss_queue("submit", str(cmds), env=settings_env(settings, run_tag), timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("submit hung on the FIFO")
    assert res.returncode == 0, res.stderr
    # Then the pair fails in one line naming the file and what it is; the other one runs
    [batch] = api.list_batches(settings=settings)
    status = api.wait(batch.batch, settings=settings, timeout=30)
    assert (status.failed, status.succeeded) == (1, 1)
    [failure] = api.failures(batch.batch, settings=settings)
    assert "pair_warp.msf is a FIFO, not a regular file" in failure.message
    assert "\n" not in failure.message
    assert (sub / "other_warp.msf").exists()
