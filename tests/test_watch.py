"""`status --watch` in a real pseudo-terminal (tmux): counts, progress and ETA on screen."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import pytest

from tbss_queue import api
from tbss_queue.config import Settings
from tbss_queue.fsl.demo import make_demo

from .conftest import Worker, settings_env, write_commands
from .faults import wait_until
from .test_reliability import job


class Tmux:
    """`tbss-queue ARGS` (a shell line) in a detached 200x50 tmux session, read off its screen."""

    def __init__(self, settings: Settings, run_tag: str, args: str) -> None:
        if shutil.which("tmux") is None:
            pytest.fail("tmux is not installed (apt-get install tmux)")
        self.session = f"tbssq-{uuid.uuid4().hex[:8]}"
        env = settings_env(settings, run_tag)
        exports = " ".join(
            f"{k}={shlex.quote(v)}"
            for k, v in env.items()
            if k.startswith(("TBSS_QUEUE_", "PYTHON"))
        )
        self.command = f"export {exports}; {shlex.quote(sys.executable)} -m tbss_queue {args}"

    def __enter__(self) -> Tmux:
        subprocess.run(
            ["tmux", "new-session", "-d", "-s", self.session, "-x", "200", "-y", "50"], check=True
        )
        subprocess.run(["tmux", "set-option", "-t", self.session, "remain-on-exit", "on"])
        self.keys(f"clear; {self.command}", "Enter")
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.session], check=False)

    def keys(self, *keys: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.session, *keys], check=True)

    def screen(self) -> str:
        return subprocess.run(
            ["tmux", "capture-pane", "-p", "-t", self.session], capture_output=True, text=True
        ).stdout

    def wait_for(self, pattern: str, timeout: float = 60) -> str:
        """The screen once `pattern` (a regular expression) is on it."""
        deadline = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < deadline:
            screen = self.screen()
            if re.search(pattern, screen) or re.search(pattern, screen.replace("\n", "")):
                return screen
            time.sleep(0.5)
        raise AssertionError(f"{pattern!r} not on screen:\n{screen}")


def test_status_watch_shows_counts_and_eta(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], run_tag: str
) -> None:
    workers("w1", 1)
    batch = api.submit(
        write_commands(
            tmp_path / "c", [job(i, tmp_path / "log", "--sleep", "1") for i in range(30)]
        ),
        settings=settings,
    )
    with Tmux(settings, run_tag, f"status --watch {batch.id}") as term:
        screen = term.wait_for(r"(?s)(?=.*ETA \d+(m\d+)?s)(?=.*\b[1-9]\d*/30 finished)")
        for column in ("total", "queued", "running", "succeeded", "failed", "w1@"):
            assert column in screen, screen


def test_status_watch_follows_the_latest_batch_and_ctrl_c_leaves_it_running(
    tmp_path: Path, settings: Settings, run_tag: str
) -> None:
    # Given a batch, and `status --watch` with no batch named
    first = api.submit(write_commands(tmp_path / "a", ["true a1", "true a2"]), settings=settings)
    rc = tmp_path / "rc"
    with Tmux(settings, run_tag, f"status --watch; echo rc=$? > {rc}") as term:
        screen = term.wait_for(f"batch {first.id} · updated at")
        # Then it says when it was drawn and how to leave, with the bar clear of its figures
        assert re.search(rf"batch {first.id} · updated at \d\d:\d\d:\d\d · Ctrl-C to leave", screen)
        assert re.search(r"━\s{2,}0/2 finished \(0%\)", screen), screen
        assert "no worker online for" in screen
        # When a newer batch is submitted, the watch moves on to it
        second = api.submit(write_commands(tmp_path / "b", ["true b1"]), settings=settings)
        screen = term.wait_for(f"batch {second.id} · updated at")
        assert "0/1 finished" in screen
        # and Ctrl-C leaves: exit 0, the batch continues
        term.keys("C-c")
        screen = term.wait_for("stopped watching")
        assert f"stopped watching; batch {second.id} continues (tbss-queue status {second.id})" in (
            screen.replace("\n", "")
        )
        assert "interrupted" not in screen
        deadline = time.monotonic() + 10
        while not rc.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    assert rc.read_text().strip() == "rc=0"
    assert api.status(second.id, settings=settings).queued == 1


def test_status_watch_matrix_updates_the_subject_matrix_live(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], run_tag: str
) -> None:
    # Given a 3-subject demo study queued with no worker yet
    study = make_demo(tmp_path / "study", subjects=3, seconds=0.1)
    batch = api.submit(study.commands, settings=settings)
    rc = tmp_path / "rc"
    with Tmux(settings, run_tag, f"status --watch --matrix; echo rc=$? > {rc}") as term:
        # When it is watched with --matrix
        screen = term.wait_for(r"0 of 9 pairs done")
        # Then the matrix is on the dashboard, under the counts
        assert f"batch {batch.id} · updated at" in screen
        assert "subject matrix" in screen, screen
        assert screen.index("subject matrix") > screen.index("total"), screen
        # and when a worker runs the pairs, the matrix follows
        workers("w1", 2)
        screen = term.wait_for(r"9 of 9 pairs done")
        assert "best target:" in screen, screen
        term.keys("C-c")
        term.wait_for("stopped watching")
        deadline = time.monotonic() + 10
        while not rc.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    assert rc.read_text().strip() == "rc=0"


def test_a_cancelled_batch_is_not_called_finished_and_leaving_an_ended_one_says_so(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], run_tag: str
) -> None:
    # Given a batch of 16 of which 2 ran, then 14 were cancelled (one of them while running)
    lines = ["true 1", "true 2"] + [f"sleep {60 + i}" for i in range(14)]
    batch = api.submit(write_commands(tmp_path / "c", lines), settings=settings)
    workers("w1", 1)

    def two_ran_one_runs() -> bool:
        s = api.status(batch.id, settings=settings)
        return s.succeeded == 2 and s.running == 1

    wait_until(two_ran_one_runs, what="2 succeeded, 1 running")
    api.cancel(batch.id, settings=settings)
    rc = tmp_path / "rc"
    with Tmux(settings, run_tag, f"status --watch {batch.id}; echo rc=$? > {rc}") as term:
        # When it is watched
        screen = term.wait_for(f"batch {batch.id} · updated at")
        # Then its figures count the 2 that ran as finished, and the 14 as cancelled
        flat = screen.replace("\n", "")
        assert "2/16 finished (12%), 14 cancelled" in flat, screen
        assert "16/16" not in flat and "100%" not in flat, screen
        # and the node table agrees with the counts: nothing runs any more
        [w1_row] = [ln.split() for ln in screen.splitlines() if ln.strip().startswith("w1@")]
        assert w1_row[2] == "0", screen
        # and Ctrl-C says the batch has ended, not that it continues
        term.keys("C-c")
        screen = term.wait_for("stopped watching")
        flat = screen.replace("\n", "")
        assert f"stopped watching; batch {batch.id} has ended" in flat, screen
        assert "continues" not in flat, screen
        deadline = time.monotonic() + 10
        while not rc.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    assert rc.read_text().strip() == "rc=0"
