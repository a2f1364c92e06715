"""Honest endings (issue 15, points 1, 7, 8, 9): what Ctrl-C, `cancel`, `--wait` and `run` say
and exit with, one-line errors, and the small CLI wordings, as a user sees them."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tbss_queue import api
from tbss_queue.config import Settings

from .conftest import Worker, settings_env, tbss_queue, write_commands
from .test_reliability import job


def _cli(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tbss_queue", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
    )


def test_ctrl_c_on_submit_wait_leaves_the_batch_running_and_exits_0(
    tmp_path: Path, settings: Settings, run_tag: str
) -> None:
    # Given `submit --wait` waiting on a batch (no worker: it stays queued)
    cmds = write_commands(tmp_path / "c", ["true 1", "true 2"])
    env = settings_env(settings, run_tag)
    proc = _cli("submit", str(cmds), "--wait", env=env)
    deadline = time.monotonic() + 30
    while not api.list_batches(settings=settings) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.5)  # into the wait
    # When the user presses Ctrl-C
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    # Then it exits 0, says the batch goes on and how to look at it, and printed its id
    [batch] = api.list_batches(settings=settings)
    assert proc.returncode == 0, err
    assert out.strip() == batch.batch
    assert (
        f"stopped watching; batch {batch.batch} continues (tbss-queue status {batch.batch})" in err
    )
    assert "interrupted" not in err
    assert api.status(batch.batch, settings=settings).queued == 2


def test_submit_wait_prints_the_id_and_run_says_it_uses_the_broker(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], run_tag: str
) -> None:
    workers("w1", 2)
    env = settings_env(settings, run_tag)
    # B=$(tbss-queue submit --wait ...) holds the batch id
    cmds = write_commands(tmp_path / "c", [job(i, tmp_path / "log") for i in range(2)])
    res = tbss_queue("submit", str(cmds), "--wait", env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == api.status(settings=settings).batch
    # `run` with TBSS_QUEUE_BROKER set says where the batch goes and that nothing starts here
    one = write_commands(tmp_path / "one", [job("x", tmp_path / "log")])
    res = tbss_queue("run", str(one), "-c", "4", env=env)
    assert res.returncode == 0, res.stderr
    assert "a broker is configured (--broker / TBSS_QUEUE_BROKER)" in res.stderr
    assert "nothing starts on this machine (-c is ignored)" in res.stderr
    # and "1 command", not "1 commands"
    assert ": 1 command queued" in res.stderr, res.stderr


def test_cancel_asks_refuses_without_a_terminal_and_needs_a_named_batch(
    tmp_path: Path, settings: Settings, run_tag: str
) -> None:
    env = settings_env(settings, run_tag)
    batch = api.submit(write_commands(tmp_path / "c", ["true 1"]), settings=settings)
    # Not on a terminal and without --yes: refused in one line, exit 2, nothing cancelled
    res = tbss_queue("cancel", batch.id, env=env)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "tbss-queue: error: cancel asks before it kills anything and there is no terminal to "
        f"ask on: pass the batch and --yes (tbss-queue cancel {batch.id} --yes)"
    ]
    # --yes without a batch: refused, naming the latest rather than cancelling it
    res = tbss_queue("cancel", "--yes", env=env)
    assert res.returncode == 2 and f"the latest is {batch.id}" in res.stderr
    assert api.status(batch.id, settings=settings).queued == 1
    # Named with --yes: cancelled
    res = tbss_queue("cancel", batch.id, "--yes", env=env)
    assert res.returncode == 0, res.stderr
    assert api.status(batch.id, settings=settings).cancelled == 1


def test_answering_no_to_cancel_in_a_terminal_exits_0_and_keeps_the_batch(
    tmp_path: Path, settings: Settings, run_tag: str
) -> None:
    from .test_watch import Tmux

    batch = api.submit(write_commands(tmp_path / "c", ["true 1", "true 2"]), settings=settings)
    rc = tmp_path / "rc"
    with Tmux(settings, run_tag, f"cancel; echo rc=$? > {rc}") as term:
        # the question names the batch (the latest: none was named) and what it would kill
        screen = term.wait_for(re.escape(f"cancel batch {batch.id} (the latest batch)"))
        assert "drop 2 queued and kill 0 running?" in screen.replace("\n", ""), screen
        term.keys("n", "Enter")
        screen = term.wait_for("not cancelled")
        _wait_for_file(rc)
    assert f"not cancelled; batch {batch.id} continues (tbss-queue status {batch.id})" in screen
    assert "interrupted" not in screen
    assert rc.read_text().strip() == "rc=0"
    assert api.status(batch.id, settings=settings).queued == 2


def _wait_for_file(path: Path, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)


def test_small_wordings_resubmission_time_limit_batches_failures(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], run_tag: str
) -> None:
    env = settings_env(settings, run_tag)
    # --time-limit 0 means nothing: refused in one line
    cmds = write_commands(tmp_path / "c", [f"true {i}" for i in range(9)])
    res = tbss_queue("submit", str(cmds), "--time-limit", "0", env=env)
    assert res.returncode == 2 and "--time-limit 0 s must be positive" in res.stderr
    # A resubmission of a batch still queued says so, not "9 skipped"
    first = tbss_queue("submit", str(cmds), env=env)
    again = tbss_queue("submit", str(cmds), env=env)
    assert again.returncode == 0, again.stderr
    assert "0 commands queued, 9 already queued, running or done there" in again.stderr
    assert "skipped" not in again.stderr
    assert first.stdout == again.stdout
    # `batches` has a header, the file and the submit time
    listed = tbss_queue("batches", env=env).stdout.splitlines()
    assert listed[0].split()[:4] == ["batch", "submitted", "file", "total"], listed
    assert str(cmds) in listed[1] and time.strftime("%Y-%m-%d") in listed[1], listed
    # `failures` piped: a long command on one line, whole; nothing but a note when none failed
    assert tbss_queue("failures", env=env).stdout == ""
    workers("w1", 2)
    long_dir = tmp_path / ("a-rather-long-directory-name-for-a-study" * 2)
    long_dir.mkdir()
    bad = write_commands(
        long_dir / "bad", [job("bad_subject_with_a_long_name", long_dir / "log", "--exit", "3")]
    )
    done = api.wait(api.submit(bad, settings=settings).id, settings=settings, timeout=60)
    assert done.failed == 1
    shown = tbss_queue("failures", env={**env, "COLUMNS": "80"}).stdout
    assert "failed commands (1):" in shown and re.search(r"line 1 on w1@\S+: exit code 3", shown)
    [command_line] = [ln for ln in shown.splitlines() if "bad_subject_with_a_long_name" in ln]
    assert len(command_line) > 80 and command_line.strip().endswith("--exit 3"), shown


def test_one_line_errors_for_a_bad_broker_port_and_a_busy_flower_port(
    tmp_path: Path, settings: Settings, run_tag: str
) -> None:
    env = {**settings_env(settings, run_tag), "TBSS_QUEUE_BROKER": "redis://localhost:notaport/0"}
    cmds = write_commands(tmp_path / "c", ["true"])
    for verb in (["submit", str(cmds)], ["worker"], ["flower"], ["batches"]):
        res = tbss_queue(*verb, env=env, cwd=tmp_path)
        assert res.returncode == 2, (verb, res.stderr)
        assert res.stderr.strip().splitlines() == [
            "tbss-queue: error: --broker / TBSS_QUEUE_BROKER: 'redis://localhost:notaport/0': "
            "the port is not a number from 1 to 65535"
        ], verb
    # Given a port somebody already listens on
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        res = tbss_queue(
            "flower", "--port", str(port), "--db", str(tmp_path / "f.db"),
            env=settings_env(settings, run_tag), timeout=60,
        )  # fmt: skip
    # Then flower says so in one line and exits 2
    assert res.returncode == 2, res.stderr
    [line] = res.stderr.strip().splitlines()
    assert line.startswith(f"tbss-queue: error: --port {port}: cannot listen on 127.0.0.1:{port}")
    assert "Traceback" not in res.stderr


def test_worker_banner_tells_the_truth_about_events_and_root(
    settings: Settings, workers: Callable[..., Worker]
) -> None:
    log = workers("w1", 1).log.read_text()
    assert "task events: off until a Flower asks for them (tbss-queue flower)" in log
    assert "enable -E" not in log
    assert "SecurityWarning" not in log and "absolutely not recommended" not in log
    if os.geteuid() == 0:
        assert "running as root: every command runs as root too" in log
