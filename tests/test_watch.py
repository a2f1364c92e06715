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

import pytest

from tbss_queue import api
from tbss_queue.config import Settings

from .conftest import Worker, settings_env, write_commands
from .test_reliability import job


def test_status_watch_shows_counts_and_eta(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], run_tag: str
) -> None:
    if shutil.which("tmux") is None:
        pytest.fail("tmux is not installed (apt-get install tmux)")
    workers("w1", 1)
    batch = api.submit(
        write_commands(
            tmp_path / "c", [job(i, tmp_path / "log", "--sleep", "1") for i in range(30)]
        ),
        settings=settings,
    )
    session = f"watch-{uuid.uuid4().hex[:8]}"
    env = settings_env(settings, run_tag)
    command = (
        " ".join(
            f"{k}={shlex.quote(v)}"
            for k, v in env.items()
            if k.startswith(("TBSS_QUEUE_", "PYTHON"))
        )
        + f" {shlex.quote(sys.executable)} -m tbss_queue status --watch {batch.id}"
    )
    subprocess.run(
        ["tmux", "new-session", "-d", "-s", session, "-x", "120", "-y", "40", command], check=True
    )
    try:
        deadline = time.monotonic() + 60
        screen = ""
        while time.monotonic() < deadline:
            screen = subprocess.run(
                ["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True
            ).stdout
            if re.search(r"ETA \d+(m\d+)?s", screen) and re.search(
                r"\b[1-9]\d*/30 finished", screen
            ):
                break
            time.sleep(1)
        assert re.search(r"ETA \d+(m\d+)?s", screen), screen
        for column in ("total", "queued", "running", "succeeded", "failed", "w1@"):
            assert column in screen, screen
        assert re.search(r"\b[1-9]\d*/30 finished", screen), screen
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], check=False)
