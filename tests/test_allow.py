"""`--allow` trusts files, never names or patterns (issue 27, points 5 and 6)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from tbss_queue import api
from tbss_queue.config import Settings

from .conftest import Worker, write_commands


def test_allow_name_trusts_the_file_it_names_at_start_not_the_name(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker]
) -> None:
    # Given a worker allowed to run `touch`, and a copy of dash named touch in the study
    study = tmp_path / "study"
    study.mkdir()
    shutil.copy2(shutil.which("dash") or "/bin/sh", study / "touch")
    trusted = Path(shutil.which("touch") or "/usr/bin/touch").resolve()
    w = workers("w1", 1, "--allow", "touch", "--root", str(study))
    # When the copy is run by its path, and the real touch by its name
    cmds = write_commands(study / "cmds", ["./touch -c 'touch canary_shell'", "touch ok"])
    batch = api.submit(cmds, settings=settings)
    status = api.wait(batch.id, settings=settings, timeout=60)
    # Then the copy is refused, naming the file; the real one ran; the banner names it
    assert (status.failed, status.succeeded) == (1, 1)
    [refused] = api.failures(batch.id, settings=settings)
    assert refused.cause == "refused" and str(study / "touch") in refused.message
    assert not (study / "canary_shell").exists() and (study / "ok").exists()
    assert f"trusts {trusted}" in w.log.read_text()


def test_a_pattern_is_not_an_allowlist(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker]
) -> None:
    # Given a command that runs a shell through a program no denylist names
    cmds = write_commands(tmp_path / "cmds", ["stdbuf -o0 sh -c 'touch canary_stdbuf'"])
    api.submit(cmds, settings=settings)
    # When a worker is started with --allow '*'
    w = workers("w1", 1, "--allow", "*", ready=False)
    try:
        code = w.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        code = None
    # Then it refuses to start, saying why and what to use instead; nothing ran
    assert code == 2, w.log.read_text()
    assert "--allow '*'" in w.log.read_text() and "--allow-any" in w.log.read_text()
    assert not (tmp_path / "canary_stdbuf").exists()
