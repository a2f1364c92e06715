"""Running one command: exit codes, output tails, missing things, the whole tree killed."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from tbss_queue.execution.runner import (
    SHARED_WAIT,
    TAIL_BYTES,
    RunResult,
    RunSpec,
    Stop,
    Watch,
    run_command,
)

JOB = str(Path(__file__).parent / "bin" / "job.py")
_WATCH = {"on_tick", "tick", "stop", "wake_fd", "lease_until"}


def run(argv: list[str], cwd: str, **options: Any) -> RunResult:
    """run_command with its spec and watch given as keywords, as the tests read best."""
    watch = Watch(**{k: v for k, v in options.items() if k in _WATCH})
    spec = RunSpec(argv, cwd, **{k: v for k, v in options.items() if k not in _WATCH})
    return run_command(spec, watch)


def test_success_records_exit_code_times_and_output(tmp_path: Path) -> None:
    r = run([sys.executable, "-c", "print('hello')"], str(tmp_path))
    assert r.ok and r.exit_code == 0 and r.stdout_tail == "hello\n"
    assert r.ended >= r.started and r.duration >= 0


def test_failure_carries_exit_code_and_stderr(tmp_path: Path) -> None:
    r = run([sys.executable, JOB, "x", "--exit", "3", "--stderr", "no such image"], str(tmp_path))
    assert not r.ok and r.cause == "exit" and r.exit_code == 3
    assert "exit code 3" in r.message and "no such image" in r.message
    assert "no such image" in r.stderr_tail


def test_runs_in_the_given_directory_without_a_shell(tmp_path: Path) -> None:
    r = run(["touch", "made by $USER; rm -rf x"], str(tmp_path))
    assert r.ok and (tmp_path / "made by $USER; rm -rf x").exists()


def test_only_the_last_64_kib_of_output_is_kept(tmp_path: Path) -> None:
    code = "import sys; sys.stdout.write('a' * 200000 + 'END')"
    r = run([sys.executable, "-c", code], str(tmp_path))
    assert len(r.stdout_tail) == TAIL_BYTES and r.stdout_tail.endswith("END")


def test_missing_executable_and_directory_are_plain_failures(tmp_path: Path) -> None:
    r = run(["no-such-program-xyz", "a"], str(tmp_path))
    assert r.cause == "not-found" and r.message == "executable not found: no-such-program-xyz"
    r = run(["true"], str(tmp_path / "gone"))
    assert r.cause == "no-cwd" and "does not exist" in r.message


def test_time_limit_kills_the_command_and_its_children(tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    start = time.monotonic()
    r = run(
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
    r = run([sys.executable, "-c", code], str(tmp_path))
    assert r.ok
    assert not _alive(int(r.stdout_tail))


def test_tick_is_called_while_the_command_runs(tmp_path: Path) -> None:
    ticks: list[int] = []
    run(["sleep", "1"], str(tmp_path), on_tick=ticks.append, tick=0.2)
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


def _sigterm_the_command_then(after: float, then: Callable[[], None], tmp_path: Path) -> None:
    """Background: SIGTERM the command once it wrote its pid, then `then()` after `after` s."""

    def act() -> None:
        pidfile = tmp_path / "pid"
        while not pidfile.exists() or not pidfile.read_text().strip():
            time.sleep(0.02)
        os.kill(int(pidfile.read_text().split()[0]), signal.SIGTERM)
        time.sleep(after)
        then()

    threading.Thread(target=act, daemon=True).start()


def test_a_command_killed_by_the_signal_that_stops_its_worker_is_stopped_not_failed(
    tmp_path: Path,
) -> None:
    # Given: a running command, and its worker told to stop a moment after the command was
    # SIGTERMed (scancel under Slurm's proctrack/linuxproc signals both, in either order)
    told: list[bool] = []
    _sigterm_the_command_then(0.3, lambda: told.append(True), tmp_path)
    # When: the command dies of that SIGTERM
    r = run(
        [sys.executable, JOB, "x", "--sleep", "30", "--pidfile", str(tmp_path / "pid")],
        str(tmp_path),
        stop=lambda: Stop("the worker is stopping") if told else None,
    )
    # Then: it was stopped (to be handed back), not failed
    assert r.cause == "stopped" and "the worker is stopping" in r.message


def test_a_command_killed_by_sigterm_alone_fails(tmp_path: Path) -> None:
    # Given: a running command whose worker is never told to stop
    _sigterm_the_command_then(0, lambda: None, tmp_path)
    # When: someone SIGTERMs the command
    began = time.monotonic()
    r = run(
        [sys.executable, JOB, "x", "--sleep", "30", "--pidfile", str(tmp_path / "pid")],
        str(tmp_path),
        stop=lambda: None,
    )
    # Then: it failed by that signal, after waiting SHARED_WAIT for a stop that never came
    assert r.cause == "signal" and "SIGTERM" in r.message
    assert SHARED_WAIT <= time.monotonic() - began < 10


def test_runs_the_given_file_in_the_opened_directory_whatever_the_paths_say(
    tmp_path: Path,
) -> None:
    # Given a directory opened by descriptor, then renamed and replaced by a symlink elsewhere
    (tmp_path / "d").mkdir()
    (tmp_path / "elsewhere").mkdir()
    fd = os.open(tmp_path / "d", os.O_RDONLY | os.O_DIRECTORY)
    try:
        (tmp_path / "d").rename(tmp_path / "d.orig")
        (tmp_path / "d").symlink_to(tmp_path / "elsewhere")
        # When a venv's python (a symlink) runs with its real file as the executable
        real = os.path.realpath(sys.executable)
        r = run(
            [sys.executable, "-c", "import os, sys; open('here', 'w'); print(sys.prefix)"],
            str(tmp_path / "d"),
            executable=real,
            cwd_fd=fd,
        )
    finally:
        os.close(fd)
    # Then it ran in the opened directory, and argv[0] kept the venv's own python
    assert r.ok, r.message
    assert (tmp_path / "d.orig" / "here").exists()
    assert not (tmp_path / "elsewhere" / "here").exists()
    assert r.stdout_tail.strip() == sys.prefix


def test_a_command_announced_to_the_guard_dies_with_its_owner_before_it_was_started(
    tmp_path: Path,
) -> None:
    # Given a guard whose slot says a command with tag T is about to start, and that command
    # running (its owner died before writing its process group: the spawn's window, which a
    # parent-death signal used to cover)
    from tbss_queue.execution import guard

    slot = guard.Slot.create()
    keeper = subprocess.Popen(
        [sys.executable, "-S", "-I", guard.__file__, str(slot.fd)],
        stdin=subprocess.PIPE,
        pass_fds=(slot.fd,),
        start_new_session=True,
    )
    assert keeper.stdin is not None
    slot.write(0, "tag-t", 0.0)
    pidfile = tmp_path / "pid"
    command = subprocess.Popen(
        [sys.executable, JOB, "x", "--child", "--sleep", "600", "--pidfile", str(pidfile)],
        env={**os.environ, guard.TAG_VAR: "tag-t"},
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (pidfile.exists() and len(pidfile.read_text().split()) == 2):
            assert time.monotonic() < deadline, "the command never started its child"
            time.sleep(0.05)
        pids = [int(p) for p in pidfile.read_text().split()]
        # When its owner is gone (the guard's pipe closes)
        keeper.stdin.close()
        # Then the guard kills the command and its child, found by their tag
        command.wait(timeout=10)
        assert command.returncode == -signal.SIGKILL
        assert all(not _alive(p) for p in pids)
        assert keeper.wait(timeout=10) == 0
    finally:
        for proc in (command, keeper):
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=10)


def test_the_guard_kills_a_command_whose_lease_ran_out_and_only_once(tmp_path: Path) -> None:
    # Given a guard, and a running command whose slot says its lease runs out in 1 s
    from tbss_queue.execution import guard

    slot = guard.Slot.create()
    keeper = subprocess.Popen(
        [sys.executable, "-S", "-I", guard.__file__, str(slot.fd)],
        stdin=subprocess.PIPE,
        pass_fds=(slot.fd,),
        start_new_session=True,
    )
    command = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        slot.write(command.pid, "tag-l", guard.uptime() + 1.0)
        # When its owner renews nothing (frozen) past that moment
        # Then the guard kills its group, and the guard itself goes on
        assert command.wait(timeout=10) == -signal.SIGKILL
        assert keeper.poll() is None
    finally:
        if keeper.stdin is not None:
            keeper.stdin.close()
        for proc in (command, keeper):
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=10)
