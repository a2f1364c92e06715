"""FSL's own fsl_sub (from PyPI) submitting to tbss-queue through our plugin."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tbss_queue import api
from tbss_queue.config import Settings
from tbss_queue.fsl.jobs import load_job
from tbss_queue.models import BatchStatus
from tbss_queue.queue.broker import connect

from .conftest import Worker, settings_env, write_commands

PLUGIN_CONF = Path(__file__).parent.parent / "fsl_sub_plugin_tbss_queue" / "fsl_sub_tbss_queue.yml"
JOB = str(Path(__file__).parent / "bin" / "job.py")


@pytest.fixture
def fsl_sub_env(tmp_path: Path, settings: Settings, run_tag: str) -> dict[str, str]:
    exe = shutil.which("fsl_sub")
    if exe is None:
        pytest.fail("fsl_sub is not installed (pip install -e '.[test]' brings fsl-sub)")
    conf = tmp_path / "fsl_sub.yml"
    conf.write_text(PLUGIN_CONF.read_text())
    return {**settings_env(settings, run_tag), "FSLSUB_CONF": str(conf)}


def fsl_sub(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["fsl_sub", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60
    )


ENV_DUMP = """import json, os, sys
keys = [k for k in os.environ if k.startswith(("FSLSUB_", "TBSSQ_"))]
var = os.environ.get("FSLSUB_ARRAYTASKID_VAR")
name = os.environ[var] if var else "single"
json.dump({k: os.environ[k] for k in keys}, open(f"env.{name}.json", "w"))
"""


def batch_of(job_id: str, settings: Settings) -> str:
    job = load_job(connect(settings), int(job_id))
    assert job is not None, f"no job {job_id}"
    return job.batch


def wait_job(job_id: str, settings: Settings, timeout: float = 60) -> BatchStatus:
    return api.wait(batch_of(job_id, settings), settings=settings, timeout=timeout, poll=0.2)


def report(job_id: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["fsl_sub_report", job_id], env=env, cwd=cwd, capture_output=True, text=True, timeout=60
    )


def task_states(text: str) -> dict[int, str]:
    """fsl_sub_report's 'Array ID: N' / 'Job state: S' lines as {N: S} (a single task: {1: S})."""
    states, current = {}, 1
    for line in text.splitlines():
        if line.startswith("Array ID: "):
            current = int(line.split(": ", 1)[1])
        elif line.startswith("Job state: "):
            states[current] = line.split(": ", 1)[1]
    return states


def test_fsl_sub_job_ids_are_integers_new_per_submission_with_their_own_logs(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], fsl_sub_env: dict[str, str]
) -> None:
    workers("w1")
    fa = tmp_path / "FA"
    fa.mkdir()
    lines = [f"{sys.executable} {JOB} {i} --out out{i}" for i in (1, 2, 3)]
    lines[1] = f"{sys.executable} {JOB} 2 --fail-unless fixed --stderr oops"
    write_commands(fa / ".commands", lines)
    # When: as tbss_2_reg calls it
    args = ("-l", "tbss_logs", "-T", "60", "-N", "tbss_2_reg", "-t", ".commands")
    first = fsl_sub(*args, env=fsl_sub_env, cwd=fa)
    # Then fsl_sub prints an integer job id, which fsl_sub's own tools take
    assert first.returncode == 0, first.stderr
    job1 = first.stdout.strip()
    assert job1.isdecimal()
    final = wait_job(job1, settings)
    assert (final.succeeded, final.failed) == (2, 1)
    shown = report(job1, fsl_sub_env, fa)
    assert shown.returncode == 0 and "Traceback" not in shown.stderr, shown.stderr
    assert task_states(shown.stdout) == {1: "Finished", 2: "Failed", 3: "Finished"}
    assert (fa / "tbss_logs" / f"tbss_2_reg.o{job1}.1").exists()
    assert "is missing" in (fa / "tbss_logs" / f"tbss_2_reg.e{job1}.2").read_text()
    # When the same file is submitted again (the failed pair fixed meanwhile)
    (fa / "fixed").write_text("")
    second = fsl_sub(*args, env=fsl_sub_env, cwd=fa)
    assert second.returncode == 0, second.stderr
    job2 = second.stdout.strip()
    # Then it is a new job with its own logs; the first job's log still tells its own story
    assert int(job2) > int(job1)
    assert wait_job(job2, settings).failed == 0
    assert task_states(report(job2, fsl_sub_env, fa).stdout)[2] == "Finished"
    assert (fa / "tbss_logs" / f"tbss_2_reg.e{job2}.2").read_text() == "oops\n"
    assert "is missing" in (fa / "tbss_logs" / f"tbss_2_reg.e{job1}.2").read_text()


def test_fsl_sub_delete_job_cancels_and_unknown_ids_are_clean_errors(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], fsl_sub_env: dict[str, str]
) -> None:
    workers("w1", 1)
    write_commands(tmp_path / "c", [f"{sys.executable} {JOB} {i} --sleep 30" for i in (1, 2)])
    job = fsl_sub("-t", "c", "-N", "long", env=fsl_sub_env, cwd=tmp_path).stdout.strip()
    deadline = time.monotonic() + 30
    while "Running" not in task_states(report(job, fsl_sub_env, tmp_path).stdout).values():
        assert time.monotonic() < deadline
        time.sleep(0.3)
    # When fsl_sub deletes the job
    gone = fsl_sub("--delete_job", job, env=fsl_sub_env, cwd=tmp_path)
    # Then it is cancelled: the running task killed, the queued one dropped, both failed
    assert gone.returncode == 0, gone.stderr
    final = wait_job(job, settings, timeout=30)
    assert final.cancelled == 2
    assert set(task_states(report(job, fsl_sub_env, tmp_path).stdout).values()) == {"Failed"}
    # and a number that is no job is an error of fsl_sub's own, not a traceback
    unknown = report("999999", fsl_sub_env, tmp_path)
    assert unknown.returncode == 2 and "Unrecognised job id 999999" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    not_deleted = fsl_sub("--delete_job", "999999", env=fsl_sub_env, cwd=tmp_path)
    assert not_deleted.returncode == 1 and "Unrecognised job id 999999" in not_deleted.stderr
    assert "Traceback" not in not_deleted.stderr


def test_fsl_sub_tasks_run_where_fsl_sub_ran_with_its_variables_and_log_names(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], fsl_sub_env: dict[str, str]
) -> None:
    workers("w1")
    (tmp_path / "env.py").write_text(ENV_DUMP)
    here = tmp_path / "here"
    here.mkdir()
    # Given a task file kept elsewhere than the directory fsl_sub is called from
    (tmp_path / "tasks").mkdir()
    write_commands(
        tmp_path / "tasks" / "cmds", [f"{sys.executable} {tmp_path}/env.py {i}" for i in (1, 2)]
    )
    array = fsl_sub("-N", "arr", "-t", "../tasks/cmds", env=fsl_sub_env, cwd=here)
    assert array.returncode == 0, array.stderr
    job = array.stdout.strip()
    wait_job(job, settings)
    # Then the tasks ran in fsl_sub's directory, logs there too (no -l: as fsl_sub's shell)
    assert sorted(p.name for p in here.glob("arr.*")) == [
        f"arr.e{job}.1",
        f"arr.e{job}.2",
        f"arr.o{job}.1",
        f"arr.o{job}.2",
    ]
    env2 = json.loads((here / "env.2.json").read_text())
    assert env2[env2["FSLSUB_JOBID_VAR"]] == job
    assert env2[env2["FSLSUB_ARRAYTASKID_VAR"]] == "2"
    assert env2[env2["FSLSUB_ARRAYCOUNT_VAR"]] == "2"
    assert env2[env2["FSLSUB_NSLOTS"]] == "1"
    # When a single command is submitted: its logs carry no task number, no array variables
    single = fsl_sub("-N", "one", sys.executable, f"{tmp_path}/env.py", env=fsl_sub_env, cwd=here)
    assert single.returncode == 0, single.stderr
    one = single.stdout.strip()
    wait_job(one, settings)
    assert (here / f"one.o{one}").exists() and (here / f"one.e{one}").exists()
    env1 = json.loads((here / "env.single.json").read_text())
    assert env1[env1["FSLSUB_JOBID_VAR"]] == one and "FSLSUB_ARRAYTASKID_VAR" not in env1


def test_fsl_sub_refuses_what_tbss_queue_cannot_honour(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], fsl_sub_env: dict[str, str]
) -> None:
    workers("w1")  # a CPU-only worker: a -c cuda task must never reach it
    marker = tmp_path / "ran"
    cmd = (sys.executable, JOB, "x", "--out", str(marker))
    write_commands(tmp_path / "cmds", [shlex.join(cmd)] * 4)
    asks = {
        "-x 4": ("-x", "4", "-t", "cmds"),
        "-c cuda": ("-c", "cuda", *cmd),
        "--array_native": ("--array_native", "3", *cmd),
        "-s 4": ("-s", "4", *cmd),
        "shell syntax": (f"{shlex.join(cmd)}; rm -rf x",),
    }
    for what, args in asks.items():
        res = fsl_sub(*args, env=fsl_sub_env, cwd=tmp_path)
        # Then fsl_sub's own submission error: one line, exit 2, nothing queued
        assert res.returncode == 2, (what, res.stdout, res.stderr)
        assert res.stderr.startswith("Error submitting job - "), (what, res.stderr)
        assert "Traceback" not in res.stderr, what
    assert api.list_batches(settings=settings) == []
    time.sleep(2)
    assert not marker.exists()
    # and fsl_sub's query answers instead of failing ("no queues configured")
    copro = fsl_sub("--has_coprocessor", "cuda", env=fsl_sub_env, cwd=tmp_path)
    assert (copro.returncode, copro.stdout.strip()) == (1, "No"), copro.stderr


def test_fsl_sub_holds_on_a_job_id(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], fsl_sub_env: dict[str, str]
) -> None:
    workers("w1", 2)
    write_commands(tmp_path / "first.txt", [f"{sys.executable} {JOB} a --sleep 3 --log order"])
    first = fsl_sub("-t", "first.txt", "-N", "first", env=fsl_sub_env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    job1 = first.stdout.strip()
    # a single command held on the first job (-j ID) runs only after it ended
    cmd = (sys.executable, JOB, "b", "--log", "order")
    second = fsl_sub("-j", job1, "-N", "then", *cmd, env=fsl_sub_env, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    job2 = second.stdout.strip()
    assert task_states(report(job2, fsl_sub_env, tmp_path).stdout) == {1: "Held"}
    wait_job(job1, settings)
    deadline = time.monotonic() + 60
    while task_states(report(job2, fsl_sub_env, tmp_path).stdout) != {1: "Finished"}:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert (tmp_path / "order").read_text().split() == ["a", "b"]


@pytest.mark.slow
def test_fsl_sub_T_is_a_hint_unless_set_time_limit(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], fsl_sub_env: dict[str, str]
) -> None:
    # -T counts minutes (fsl_sub takes whole numbers): -T 1 is the shortest limit there is
    workers("w1", 2)
    limited_conf = tmp_path / "limited.yml"
    limited_conf.write_text(
        PLUGIN_CONF.read_text().replace("set_time_limit: False", "set_time_limit: True")
    )
    limited_env = {**fsl_sub_env, "FSLSUB_CONF": str(limited_conf)}
    # When both run at once a 68 s command announced as taking one minute
    cmd = (JOB, "--sleep", "68")
    hint = fsl_sub("-T", "1", "-N", "h", sys.executable, *cmd, "h", env=fsl_sub_env, cwd=tmp_path)
    limit = fsl_sub("-T", "1", "-N", "l", sys.executable, *cmd, "l", env=limited_env, cwd=tmp_path)
    assert hint.returncode == 0 and limit.returncode == 0, (hint.stderr, limit.stderr)
    # Then by default it completes; with set_time_limit: true it is killed at 60 s
    wait_job(limit.stdout.strip(), settings, timeout=120)
    [killed] = api.tasks(batch_of(limit.stdout.strip(), settings), settings=settings)
    assert killed.state == "failed" and killed.cause == "timeout", killed
    assert killed.duration is not None and 59 < killed.duration < 66
    assert wait_job(hint.stdout.strip(), settings, timeout=120).succeeded == 1
    assert task_states(report(hint.stdout.strip(), fsl_sub_env, tmp_path).stdout) == {1: "Finished"}
    assert task_states(report(limit.stdout.strip(), limited_env, tmp_path).stdout) == {1: "Failed"}


def test_plugin_is_registered_for_fsl_sub() -> None:
    from fsl_sub.utils import available_plugins

    assert "tbss_queue" in available_plugins()


def test_plan_then_fsl_sub_as_tbss_2_reg_then_best_target(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], fsl_sub_env: dict[str, str]
) -> None:
    from tbss_queue.fsl.demo import make_demo
    from tbss_queue.fsl.plan import best_target, plan

    # Given a synthetic study (stand-in fsl_reg, NOT FSL) planned as tbss_2_reg -n plans it
    study = make_demo(tmp_path / "study", subjects=3, seconds=0.05)
    planned = plan(study.root, mode="-n", fsldir=study.fsldir)
    workers("w1")
    fa = Path(study.fa_dir)
    # When the commands go through fsl_sub as tbss_2_reg sends them
    args = ("-l", "tbss_logs", "-T", "60", "-N", "tbss_2_reg", "-t", ".commands")
    res = fsl_sub(*args, env=fsl_sub_env, cwd=fa)
    assert res.returncode == 0, res.stderr
    final = wait_job(res.stdout.strip(), settings)
    # Then every registration is done, logged, and the best target can be chosen
    assert (final.total, final.succeeded) == (len(planned.lines), 9)
    assert len(list((fa / "tbss_logs").glob(f"tbss_2_reg.o{res.stdout.strip()}.*"))) == 9
    assert best_target(fa).best in {f"{s}_FA" for s in study.subjects}
    # and planning again finds nothing left to do
    assert plan(study.root, mode="-n", fsldir=study.fsldir).lines == ()
