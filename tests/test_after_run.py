"""After `tbss-queue run`, its result can be read: the read verbs open the study's kept Redis
data (FA/.tbss-queue) for the call when no broker is configured, `run --report` writes the
report, and a failed run ends with the subject matrix's summary."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import uuid
from html.parser import HTMLParser
from pathlib import Path

from tbss_queue.execution.procs import TAG_VAR, kill_tagged, tagged
from tbss_queue.fsl.demo import make_demo
from tbss_queue.fsl.outputs import read_msf

from .conftest import tbss_queue
from .faults import wait_until

BROKEN = "sub03: 2 of 2 pairs failed as moving, 2 of 2 as reference: check its FA image"


def _env(tag: str) -> dict[str, str]:
    """A user's shell: no broker configured."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TBSS_QUEUE_")}
    return {**env, TAG_VAR: tag, "COLUMNS": "200"}


class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []

    def handle_data(self, data: str) -> None:
        self.parts.append(data)


def _html_text(path: Path) -> str:
    parser = _Text()
    parser.feed(path.read_text())
    return " ".join(" ".join(parser.parts).split())


def test_read_verbs_open_the_kept_data_of_a_run(tmp_path: Path) -> None:
    # Given a 3-subject demo study whose sub03 image is broken
    study = make_demo(tmp_path / "study", subjects=3, seconds=0.1, broken=("sub03",))
    fa = Path(study.fa_dir)
    tag = uuid.uuid4().hex
    env = _env(tag)
    try:
        # When it is run from the study's root with --report
        res = tbss_queue(
            "run", "FA/.commands", "-c", "2", "--report", "run.html", env=env, cwd=fa.parent
        )
        # Then it fails, ending with the matrix's summary (not a flat list), and the report
        # is written
        assert res.returncode == 1, res.stderr
        tail = res.stderr[res.stderr.index("5 failed") :]
        assert BROKEN in tail, res.stderr
        assert "4 of 9 pairs done" in tail, res.stderr
        assert "failed: line" not in tail, res.stderr
        assert "run.html" in res.stderr
        assert "sub03" in _html_text(fa.parent / "run.html")
        assert tagged(tag) == []

        # When the read verbs are called in FA/ with no broker configured
        res = tbss_queue("status", env=env, cwd=fa)
        # Then they read the run's batch, and leave no redis-server behind
        assert res.returncode == 0, res.stderr
        assert "failed" in res.stdout and "5" in res.stdout, res.stdout
        assert tagged(tag) == []
        res = tbss_queue("failures", env=env, cwd=fa)
        assert res.returncode == 0, res.stderr
        assert res.stdout.count("sub03") >= 5, res.stdout
        res = tbss_queue("report", "-o", "again.html", env=env, cwd=fa)
        assert res.returncode == 0, res.stderr
        assert "sub03" in _html_text(fa / "again.html")
        res = tbss_queue("logs", "sub03_FA_to_sub01_FA", "--stderr", env=env, cwd=fa)
        assert res.returncode == 0, res.stderr
        assert "Compressed file ended" in res.stdout, res.stdout
        res = tbss_queue("batches", env=env, cwd=fa)
        assert res.returncode == 0 and "5" in res.stdout, res.stderr
        # and from the study's root (the commands file's directory is FA/) too
        res = tbss_queue("status", "--matrix", env=env, cwd=fa.parent)
        assert res.returncode == 0, res.stderr
        assert BROKEN in res.stdout, res.stdout
        assert tagged(tag) == []
    finally:
        kill_tagged(tag)


def test_without_kept_data_the_broker_error_says_where_it_looked(tmp_path: Path) -> None:
    # Given a directory where no `run` kept data, and no broker configured
    tag = uuid.uuid4().hex
    # When status is asked there
    res = tbss_queue("status", env=_env(tag), cwd=tmp_path)
    # Then it still fails on the default broker, as before, and starts nothing
    assert res.returncode == 3, res.stderr
    assert "cannot reach broker" in res.stderr
    assert tagged(tag) == []


def test_a_resumed_run_says_what_happened_once(tmp_path: Path) -> None:
    # Given a 16-registration demo study whose `run` was stopped with Ctrl-C half-way
    study = make_demo(tmp_path / "study", subjects=4, seconds=1.0)
    fa = Path(study.fa_dir)
    tag = uuid.uuid4().hex
    proc = subprocess.Popen(
        [sys.executable, "-m", "tbss_queue", "run", study.commands, "-c", "2"],
        env=_env(tag),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_until(lambda: len([p for p in fa.glob("*.msf") if read_msf(p)]) >= 4, 120, "4 done")
        proc.send_signal(signal.SIGINT)
        _, first = proc.communicate(timeout=60)
        assert proc.returncode == 130, first
        # When it is run again
        res = tbss_queue("run", study.commands, "-c", "2", env=_env(tag), timeout=180)
        # Then it completes, and says it resumed rather than that its own node stopped answering
        assert res.returncode == 0, res.stderr
        assert "stopped answering" not in res.stderr, res.stderr
        assert "resum" in res.stderr, res.stderr
        # and its two durations say what each is
        last = res.stderr.strip().splitlines()[-1]
        assert re.search(r"this run took \d+", last), last
        assert "since the batch's first start" in res.stderr, res.stderr
        assert tagged(tag) == []
    finally:
        if proc.poll() is None:
            proc.kill()
        kill_tagged(tag)


def test_status_during_a_run_asks_the_runs_own_redis(tmp_path: Path) -> None:
    # Given a `run` at work in a study whose path is too long for a socket beside its data
    deep = tmp_path / ("a-long-directory-name-for-a-study-" * 3)
    study = make_demo(deep / "study", subjects=4, seconds=1.0)
    fa = Path(study.fa_dir)
    tag = uuid.uuid4().hex
    proc = subprocess.Popen(
        [sys.executable, "-m", "tbss_queue", "run", study.commands, "-c", "1"],
        env=_env(tag),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_until(lambda: len([p for p in fa.glob("*.msf") if read_msf(p)]) >= 1, 120, "1 done")
        # When status is asked in FA/ meanwhile, with no broker configured
        res = tbss_queue("status", "--json", env=_env(tag), cwd=fa)
        # Then it reads the running batch from the run's own Redis
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["total"] == 16
        # and the run goes on to its end, unharmed
        _, stderr = proc.communicate(timeout=180)
        assert proc.returncode == 0, stderr
        assert tagged(tag) == []
    finally:
        if proc.poll() is None:
            proc.kill()
        kill_tagged(tag)
