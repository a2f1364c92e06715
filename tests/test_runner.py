"""Running one command: exit codes, output tails, missing things, the whole tree killed."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import psutil

from tbss_queue.runner import TAIL_BYTES, run_command

JOB = str(Path(__file__).parent / "bin" / "job.py")


def test_success_records_exit_code_times_and_output(tmp_path: Path) -> None:
    r = run_command([sys.executable, "-c", "print('hello')"], str(tmp_path))
    assert r.ok and r.exit_code == 0 and r.stdout_tail == "hello\n"
    assert r.ended >= r.started and r.duration >= 0


def test_failure_carries_exit_code_and_stderr(tmp_path: Path) -> None:
    r = run_command(
        [sys.executable, JOB, "x", "--exit", "3", "--stderr", "no such image"], str(tmp_path)
    )
    assert not r.ok and r.cause == "exit" and r.exit_code == 3
    assert "exit code 3" in r.message and "no such image" in r.message
    assert "no such image" in r.stderr_tail


def test_runs_in_the_given_directory_without_a_shell(tmp_path: Path) -> None:
    r = run_command(["touch", "made by $USER; rm -rf x"], str(tmp_path))
    assert r.ok and (tmp_path / "made by $USER; rm -rf x").exists()


def test_only_the_last_64_kib_of_output_is_kept(tmp_path: Path) -> None:
    code = "import sys; sys.stdout.write('a' * 200000 + 'END')"
    r = run_command([sys.executable, "-c", code], str(tmp_path))
    assert len(r.stdout_tail) == TAIL_BYTES and r.stdout_tail.endswith("END")


def test_missing_executable_and_directory_are_plain_failures(tmp_path: Path) -> None:
    r = run_command(["no-such-program-xyz", "a"], str(tmp_path))
    assert r.cause == "not-found" and r.message == "executable not found: no-such-program-xyz"
    r = run_command(["true"], str(tmp_path / "gone"))
    assert r.cause == "no-cwd" and "does not exist" in r.message


def test_time_limit_kills_the_command_and_its_children(tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    start = time.monotonic()
    r = run_command(
        [sys.executable, JOB, "x", "--child", "--sleep", "600", "--pidfile", str(pidfile)],
        str(tmp_path),
        timeout=1.0,
        tick=0.2,
    )
    assert r.cause == "timeout" and time.monotonic() - start < 30
    pids = [int(p) for p in pidfile.read_text().split()]
    assert len(pids) == 2
    for pid in pids:
        assert not _alive(pid), f"process {pid} survived the time limit"


def test_children_left_behind_by_a_finished_command_are_killed(tmp_path: Path) -> None:
    code = "import subprocess; print(subprocess.Popen(['sleep', '600']).pid)"
    r = run_command([sys.executable, "-c", code], str(tmp_path))
    assert r.ok
    assert not _alive(int(r.stdout_tail))


def test_tick_is_called_while_the_command_runs(tmp_path: Path) -> None:
    ticks: list[int] = []
    run_command(["sleep", "1"], str(tmp_path), on_tick=ticks.append, tick=0.2)
    assert len(ticks) >= 2


def _alive(pid: int) -> bool:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            return False
        time.sleep(0.1)
    return os.path.exists(f"/proc/{pid}")
