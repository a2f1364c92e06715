"""Every attempt's stdout and stderr kept in files, `tbss-queue logs`, `report --joblog`."""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tbss_queue import api
from tbss_queue.config import Settings
from tbss_queue.errors import ConfigError
from tbss_queue.execution.logs import log_stem
from tbss_queue.paths import PathMap
from tbss_queue.views.logfiles import parse_ref

from .conftest import Worker, settings_env, tbss_queue, write_commands

SAY = """import os, signal, sys
name = sys.argv[1]
print(f"stdout of {name}")
if "--big" in sys.argv:  # more than the 64 KB tail a record keeps
    sys.stdout.write("".join(f"{name} line {i:06d}\\n" for i in range(20_000)))
print(f"stderr of {name}", file=sys.stderr)
if "--signal" in sys.argv:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)
if "--exit" in sys.argv:
    sys.exit(int(sys.argv[sys.argv.index("--exit") + 1]))
if "--fail-once" in sys.argv and not os.path.exists(sys.argv[-1]):
    open(sys.argv[-1], "w").close()
    print("first attempt fails", file=sys.stderr)
    sys.exit(3)
if "--fail-unless" in sys.argv and not os.path.exists(sys.argv[-1]):
    print(f"{sys.argv[-1]} is missing", file=sys.stderr)
    sys.exit(1)
"""

FAKE_FSL_REG = """#!{python}
import sys
print("fsl_reg " + " ".join(sys.argv[1:]))
print(f"flirt: cannot read image {{sys.argv[1]}}", file=sys.stderr)
"""


@pytest.fixture
def fa(tmp_path: Path) -> Path:
    """A study's FA/ folder with the stand-in command say.py beside it."""
    (tmp_path / "say.py").write_text(SAY)
    folder = tmp_path / "FA"
    folder.mkdir()
    return folder


def say(tmp_path: Path, *args: str) -> str:
    return " ".join([sys.executable, str(tmp_path / "say.py"), *args])


def test_log_files_are_named_by_line_attempt_and_fsl_reg_pair() -> None:
    # Given commands of a file; When their log names are made; Then ls finds them by each
    assert log_stem(12, 1, ["python", "x.py"]) == "12.1"
    reg = ["/opt/fsl/bin/fsl_reg", "sub-05_FA", "sub 01_FA.nii.gz", "sub-05_FA_to_sub_01", "-e"]
    assert log_stem(7, 2, reg) == "7.2.sub-05_FA_to_sub_01_FA"
    # and a pair is named as Flower labels it, with an arrow or a comma
    assert parse_ref("7") == 7
    assert parse_ref("sub05→sub01") == parse_ref("sub05,sub01") == ("sub05", "sub01")
    assert parse_ref("sub05 -> sub01_FA") == ("sub05", "sub01_FA")
    with pytest.raises(ConfigError, match="line number or an fsl_reg pair"):
        parse_ref("sub05")


def test_every_attempt_keeps_its_whole_stdout_and_stderr_and_logs_prints_them(
    tmp_path: Path, fa: Path, settings: Settings, workers: Callable[..., Worker], run_tag: str
) -> None:
    # Given a batch whose line 2 fails twice (one --retries), then is fixed and retried
    workers("w1", 2)
    fixed = tmp_path / "fixed"
    cmds = write_commands(
        fa / ".commands",
        [say(tmp_path, "a", "--big"), say(tmp_path, "b", "--fail-unless", str(fixed))],
    )
    batch = api.submit(cmds, retries=1, settings=settings)
    assert api.wait(batch.id, settings=settings, timeout=60).failed == 1
    fixed.write_text("")
    api.retry(batch.id, settings=settings)
    assert api.wait(batch.id, settings=settings, timeout=60).ok
    # Then every attempt has its own two files in FA/.tbss-queue/logs/<batch>/
    logs = fa / ".tbss-queue" / "logs" / batch.id
    names = sorted(p.name for p in logs.iterdir())
    assert names == sorted(f"{n}.{s}" for n in ("1.1", "2.1", "2.2", "2.3") for s in ("out", "err"))
    assert (logs / "2.1.err").read_text() == f"stderr of b\n{fixed} is missing\n"
    assert (logs / "2.3.err").read_text() == "stderr of b\n"
    # the whole output, not the 64 KB tail the record keeps
    assert (logs / "1.1.out").read_text().count("\n") == 20_001
    # and the record counts attempts as the logs do
    [b] = [t for t in api.tasks(batch.id, settings=settings) if t.line == 2]
    assert b.attempt == 3
    env = settings_env(settings, run_tag)
    # When a user asks for them: the last attempt's stdout by default, on stdout, exit 0
    last = tbss_queue("logs", batch.id, "2", env=env)
    assert (last.returncode, last.stdout) == (0, "stdout of b\n"), last.stderr
    assert "attempt 3 of 3 on w1@" in last.stderr and str(logs / "2.3.out") in last.stderr
    first = tbss_queue("logs", batch.id[:4], "2", "--attempt", "1", "--stderr", env=env)
    assert (first.returncode, first.stdout) == (0, f"stderr of b\n{fixed} is missing\n")
    big = tbss_queue("logs", batch.id, "1", env=env)
    assert big.stdout == (logs / "1.1.out").read_text()
    path = tbss_queue("logs", batch.id, "2", "--attempt", "2", "--stderr", "--path", env=env)
    assert path.stdout.strip() == str(logs / "2.2.err")
    shown = json.loads(tbss_queue("logs", batch.id, "2", "--json", env=env).stdout)
    assert (shown["attempt"], shown["attempts"], shown["missing"]) == (3, 3, None)
    # and what is not there is a one-line error with exit 2
    for args, says in [
        (("9",), "has no command at line 9"),
        (("2", "--attempt", "4"), "there were 3 attempt(s)"),
        (("sub05",), "line number or an fsl_reg pair"),
    ]:
        bad = tbss_queue("logs", batch.id, *args, env=env)
        assert bad.returncode == 2 and says in bad.stderr, (args, bad.stderr)
        assert "Traceback" not in bad.stderr


def test_a_failed_fsl_reg_pair_is_found_by_its_pair(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], run_tag: str
) -> None:
    # Given an fsl_reg that writes no outputs (flirt failed) and so fails as 'missing output'
    (tmp_path / "bin").mkdir()
    fsl_reg = tmp_path / "bin" / "fsl_reg"
    fsl_reg.write_text(FAKE_FSL_REG.format(python=sys.executable))
    fsl_reg.chmod(0o755)
    fa = tmp_path / "FA"
    fa.mkdir()
    pairs = [("sub05", "sub01"), ("sub01", "sub05")]
    lines = [f"{fsl_reg} {a}_FA {b}_FA {a}_FA_to_{b}_FA -e -FA" for a, b in pairs]
    workers("w1", 2)
    batch = api.wait(
        api.submit(write_commands(fa / ".commands", lines), settings=settings).id,
        settings=settings,
        timeout=60,
    )
    assert batch.failed == 2
    # Then its logs are named by the pair, and `logs` finds them by the pair as Flower shows it
    logs = fa / ".tbss-queue" / "logs" / batch.batch
    assert (logs / "1.1.sub05_FA_to_sub01_FA.err").exists()
    env = settings_env(settings, run_tag)
    for pair in ("sub05→sub01", "sub05,sub01", "sub05_FA,sub01_FA"):
        shown = tbss_queue("logs", batch.batch, pair, "--stderr", env=env)
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout == "flirt: cannot read image sub05_FA\n"
        assert "line 1 (sub05_FA→sub01_FA), attempt 1 of 1 on w1@" in shown.stderr
        assert ": failed" in shown.stderr
    other = tbss_queue("logs", batch.batch, "sub01→sub05", env=env)
    assert other.stdout.startswith("fsl_reg sub01_FA sub05_FA")
    none = tbss_queue("logs", batch.batch, "sub05,sub09", env=env)
    assert none.returncode == 2 and "no command at pair sub05→sub09" in none.stderr


def test_logs_finds_a_pair_by_any_name_in_this_studys_latest_batch(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], run_tag: str
) -> None:
    # Given a study whose sub05→sub01 registration failed (its log file is named
    # 1.1.sub05_FA_to_sub01_FA.err), and then a later batch of another study on the same broker
    (tmp_path / "bin").mkdir()
    fsl_reg = tmp_path / "bin" / "fsl_reg"
    fsl_reg.write_text(FAKE_FSL_REG.format(python=sys.executable))
    fsl_reg.chmod(0o755)
    fa = tmp_path / "study" / "FA"
    fa.mkdir(parents=True)
    lines = [f"{fsl_reg} {a}_FA {b}_FA {a}_FA_to_{b}_FA -e -FA" for a, b in [("sub05", "sub01")]]
    workers("w1", 2)
    ours = api.submit(write_commands(fa / ".commands", lines), settings=settings)
    api.wait(ours.id, settings=settings, timeout=60)
    other = tmp_path / "other" / "FA"
    other.mkdir(parents=True)
    later = api.submit(write_commands(other / ".commands", ["true"]), settings=settings)
    api.wait(later.id, settings=settings, timeout=60)
    assert api.status(settings=settings).batch == later.id
    env = settings_env(settings, run_tag)
    # When a user in the study (FA/ or its root) asks by any name they have, with no batch
    for where in (fa, fa.parent):
        for name in ("sub05_FA_to_sub01_FA", "sub05,sub01", "sub05→sub01", "1"):
            shown = tbss_queue("logs", name, "--stderr", env=env, cwd=where)
            # Then it is this study's batch's pair, not the later batch's line 1
            assert shown.returncode == 0, (name, shown.stderr)
            assert shown.stdout == "flirt: cannot read image sub05_FA\n", (name, shown.stdout)
            assert f"batch {ours.id}, line 1 (sub05_FA→sub01_FA)" in shown.stderr
    # and the batch can still be named first
    shown = tbss_queue("logs", ours.id, "sub05_FA_to_sub01_FA", env=env)
    assert shown.returncode == 0 and shown.stdout.startswith("fsl_reg sub05_FA"), shown.stderr
    # and three words are a usage error naming the form
    bad = tbss_queue("logs", ours.id, "1", "2", env=env)
    assert bad.returncode == 2 and "[BATCH] LINE|PAIR" in bad.stderr, bad.stderr


def test_the_logs_header_states_the_shown_attempts_own_outcome(
    tmp_path: Path, fa: Path, settings: Settings, workers: Callable[..., Worker], run_tag: str
) -> None:
    # Given a command that failed (exit 3), then was queued again with no worker to take it
    w1 = workers("w1", 1)
    mark = tmp_path / "mark"
    cmds = write_commands(fa / ".commands", [say(tmp_path, "a", "--fail-once", str(mark))])
    batch = api.submit(cmds, settings=settings)
    assert api.wait(batch.id, settings=settings, timeout=60).failed == 1
    w1.stop()
    api.retry(batch.id, settings=settings)
    env = settings_env(settings, run_tag)
    # Then its header says the attempt failed, and that the command waits its turn again
    queued = tbss_queue("logs", batch.id, "1", "--stderr", env=env).stderr.splitlines()[0]
    assert ": failed: exit code 3; queued again:" in queued, queued
    # Given it then succeeded on a second attempt
    workers("w1", 1)
    assert api.wait(batch.id, settings=settings, timeout=60).ok
    # When the first attempt's stderr is shown
    first = tbss_queue("logs", batch.id, "1", "--attempt", "1", "--stderr", env=env)
    # Then the header says that attempt failed, and what became of the command after
    assert first.returncode == 0, first.stderr
    assert first.stdout == "stderr of a\nfirst attempt fails\n"
    header = first.stderr.splitlines()[0]
    assert "attempt 1 of 2 on w1@" in header and ": failed" in header, header
    assert "then succeeded at attempt 2" in header, header
    assert "queued again" not in header, header
    # and the last attempt's header says it succeeded
    last = tbss_queue("logs", batch.id, "1", env=env)
    header = last.stderr.splitlines()[0]
    assert "attempt 2 of 2 on w1@" in header and ": succeeded" in header, header
    assert "failed" not in header, header

    # Given the same with --retries: the worker's hand-back records the failed attempt's end
    other = write_commands(
        fa / "retried.commands", [say(tmp_path, "b", "--fail-once", str(tmp_path / "mark2"))]
    )
    again = api.submit(other, retries=1, settings=settings)
    assert api.wait(again.id, settings=settings, timeout=60).ok
    shown = api.logs(again.id, 1, attempt=1, settings=settings)
    # Then its header says that attempt failed, and that the command then succeeded
    header = shown.header("err")
    assert ": failed; then succeeded at attempt 2" in header, header
    assert ": succeeded" not in header, header


def test_a_node_that_cannot_write_the_logs_runs_the_command_and_says_why(
    tmp_path: Path, fa: Path, settings: Settings, workers: Callable[..., Worker], run_tag: str
) -> None:
    # Given a study whose log folder is a symlink pointing out of the worker's --root
    outside = tmp_path / "outside"
    outside.mkdir()
    (fa / ".tbss-queue").mkdir()
    (fa / ".tbss-queue" / "logs").symlink_to(outside)
    workers("w1", 1, "--allow-any", "--root", str(tmp_path))
    cmds = write_commands(fa / ".commands", [say(tmp_path, "a"), say(tmp_path, "b", "--exit", "3")])
    # When its batch runs
    batch = api.wait(api.submit(cmds, settings=settings).id, settings=settings, timeout=60)
    # Then the commands ran as they would have (the symlink is not followed: nothing outside)
    assert (batch.succeeded, batch.failed) == (1, 1)
    assert list(outside.iterdir()) == []
    # and `logs` says why there is no file, then shows the end the record kept
    env = settings_env(settings, run_tag)
    shown = tbss_queue("logs", batch.batch, "2", "--stderr", env=env)
    assert (shown.returncode, shown.stdout) == (0, "stderr of b\n"), shown.stderr
    assert "log files not written in" in shown.stderr and "is not followed" in shown.stderr
    [failed] = api.failures(batch.batch, settings=settings)
    assert failed.exit_code == 3


def test_logs_are_written_in_a_study_the_worker_reaches_through_a_symlink_into_its_root(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], run_tag: str
) -> None:
    # Given a study submitted as /study (a --path-map), which the worker maps to /linked, a
    # symlink to /real, its --root
    (tmp_path / "say.py").write_text(SAY)
    fa = tmp_path / "real" / "FA"
    fa.mkdir(parents=True)
    (tmp_path / "linked").symlink_to(tmp_path / "real")
    mapped = ("--path-map", f"/study={tmp_path / 'linked'}")
    workers("w1", 1, "--allow-any", "--root", str(tmp_path / "real"), *mapped)
    # When its batch runs
    cmds = write_commands(fa / ".commands", [say(tmp_path, "a")])
    submitted = api.submit(
        cmds, path_map=PathMap.parse([f"{tmp_path / 'real'}=/study"]), settings=settings
    )
    batch = api.wait(submitted.id, settings=settings, timeout=60)
    # Then the logs are there (where the policy judged the study to be: symlinks resolved)
    assert batch.succeeded == 1
    assert (fa / ".tbss-queue" / "logs" / batch.batch / "1.1.out").exists()
    # and `logs` reads them where submit saw the study
    shown = tbss_queue("logs", batch.batch, "1", env=settings_env(settings, run_tag))
    assert (shown.returncode, shown.stdout) == (0, "stdout of a\n"), shown.stderr


def test_fsl_sub_l_logs_stay_where_fsl_sub_puts_them_and_logs_reads_them(
    tmp_path: Path, fa: Path, settings: Settings, workers: Callable[..., Worker], run_tag: str
) -> None:
    # Given a batch sent as fsl_sub -l tbss_logs -N tbss_2_reg sends it (via the plugin's API)
    workers("w1", 1)
    cmds = write_commands(fa / ".commands", [say(tmp_path, "a", "--exit", "2")])
    batch = api.submit(cmds, log_dir="tbss_logs", job_name="tbss_2_reg", settings=settings)
    api.wait(batch.id, settings=settings, timeout=60)
    # Then the logs are fsl_sub's files only, not written twice
    assert (fa / "tbss_logs" / f"tbss_2_reg.e{batch.id}.1").read_text() == "stderr of a\n"
    assert not (fa / ".tbss-queue").exists()
    # and `logs` reads them there
    env = settings_env(settings, run_tag)
    shown = tbss_queue("logs", batch.id, "1", "--stderr", env=env)
    assert (shown.returncode, shown.stdout) == (0, "stderr of a\n"), shown.stderr


def test_logs_of_a_command_not_started_yet_exit_1(
    tmp_path: Path, fa: Path, settings: Settings, run_tag: str
) -> None:
    # Given a batch with no worker to run it
    batch = api.submit(write_commands(fa / ".commands", [say(tmp_path, "a")]), settings=settings)
    # When its log is asked for; Then one line and exit 1: nothing to show yet
    shown = tbss_queue("logs", batch.id, "1", env=settings_env(settings, run_tag))
    assert shown.returncode == 1
    assert (
        shown.stderr.strip()
        == f"tbss-queue: error: batch {batch.id}, line 1: not started yet (queued), no output"
    )


def test_report_joblog_is_gnu_parallels_format(
    tmp_path: Path, fa: Path, settings: Settings, workers: Callable[..., Worker], run_tag: str
) -> None:
    # Given a batch with a success, an exit code 3 and a command killed by SIGKILL
    workers("w1", 2)
    lines = [say(tmp_path, "a"), say(tmp_path, "b", "--exit", "3"), say(tmp_path, "c", "--signal")]
    batch = api.wait(
        api.submit(write_commands(fa / ".commands", lines), settings=settings).id,
        settings=settings,
        timeout=60,
    )
    assert (batch.succeeded, batch.failed) == (1, 2)
    # When the joblog is written
    joblog = tmp_path / "joblog.tsv"
    shown = tbss_queue(
        "report", batch.batch, "--joblog", str(joblog), env=settings_env(settings, run_tag)
    )
    assert shown.returncode == 0, shown.stderr
    assert f"wrote {joblog} (3 commands)" in shown.stderr
    assert not list(Path.cwd().glob(f"report-{batch.batch}.html"))
    # Then it is GNU parallel's: a tab-separated header and one row per command
    text = joblog.read_text()
    assert (
        text.splitlines()[0]
        == "Seq\tHost\tStarttime\tJobRuntime\tSend\tReceive\tExitval\tSignal\tCommand"
    )
    rows = {int(r["Seq"]): r for r in csv.DictReader(text.splitlines(), delimiter="\t")}
    assert sorted(rows) == [1, 2, 3]
    assert [(rows[n]["Exitval"], rows[n]["Signal"]) for n in (1, 2, 3)] == [
        ("0", "0"),
        ("3", "0"),
        ("-1", "9"),
    ]
    first = rows[1]
    assert first["Host"].startswith("w1@") and first["Command"] == lines[0]
    assert len(first["Starttime"].split(".")[1]) == 3 and float(first["JobRuntime"]) >= 0
    assert (first["Send"], first["Receive"]) == ("0", "0")
    # and the same from Python
    assert api.joblog(batch.batch, tmp_path / "again.tsv", settings=settings) == 3
    assert os.path.getsize(tmp_path / "again.tsv") == len(text.encode())
