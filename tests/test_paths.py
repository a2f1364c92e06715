"""Machines that mount the study or FSL at other paths."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tbss_queue import api
from tbss_queue.config import Settings
from tbss_queue.errors import ConfigError
from tbss_queue.fsl.demo import make_demo
from tbss_queue.fsl.outputs import read_msf
from tbss_queue.paths import PathMap, local_fsl_tool

from .conftest import Worker, settings_env, tbss_queue, write_commands

JOB = str(Path(__file__).parent / "bin" / "job.py")


def test_path_map_rewrites_whole_components_longest_prefix_first() -> None:
    m = PathMap.parse(["/data=/mnt/data", "/data/fa=/fast/fa"])
    assert m.apply("/data/fa/x") == "/fast/fa/x"
    assert m.apply("/data/y") == "/mnt/data/y"
    assert m.apply("/database/y") == "/database/y"
    assert m.argv(["fsl_reg", "/data/a", "b"]) == ["fsl_reg", "/mnt/data/a", "b"]
    with pytest.raises(ConfigError, match="--path-map 'data'"):
        PathMap.parse(["data"])


def test_fsl_tools_are_found_under_this_machines_fsldir(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    tool = tmp_path / "bin" / "fsl_reg"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    env = {"FSLDIR": str(tmp_path)}
    assert local_fsl_tool("/usr/share/fsl/bin/fsl_reg", env) == str(tool)
    assert local_fsl_tool("/usr/share/fsl/bin/flirt", env) == "/usr/share/fsl/bin/flirt"
    assert local_fsl_tool(sys.executable, env) == sys.executable


def test_worker_path_map_and_fsldir_let_a_worker_run_another_machines_commands(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker]
) -> None:
    # Given .commands written on a machine where the study was /mnt/study and FSL /opt/fsl
    study = make_demo(tmp_path / "study", subjects=2, seconds=0)
    fa = Path(study.fa_dir)
    text = (fa / ".commands").read_text().replace(study.fsldir, "/opt/fsl")
    (fa / ".commands").write_text(text)
    outs = write_commands(
        tmp_path / "outs", [f"{sys.executable} {JOB} {i} --out /mnt/study/out{i}" for i in range(3)]
    )
    # When a worker with its own FSLDIR and a path map runs them
    workers("w1", 2, "--path-map", f"/mnt/study={tmp_path / 'study'}", env={"FSLDIR": study.fsldir})
    a = api.wait(api.submit(fa / ".commands", settings=settings).id, settings=settings, timeout=60)
    b = api.wait(api.submit(outs, settings=settings).id, settings=settings, timeout=60)
    # Then the registrations ran with this machine's FSL and the outputs landed in its mount
    assert (a.succeeded, b.succeeded) == (4, 3)
    assert all(read_msf(p) for p in fa.glob("*_warp.msf"))
    assert sorted(p.name for p in (tmp_path / "study").glob("out*")) == ["out0", "out1", "out2"]
    # and each record holds what actually ran there, not what was submitted
    [first, *_] = api.tasks(a.batch, settings=settings)
    assert first.argv[0] == "/opt/fsl/bin/fsl_reg"
    assert first.ran is not None and first.ran[0] == f"{study.fsldir}/bin/fsl_reg"
    assert first.ran_text.startswith(f"{study.fsldir}/bin/fsl_reg")
    [out0, *_] = api.tasks(b.batch, settings=settings)
    assert out0.ran is not None and out0.ran[-1] == f"{tmp_path / 'study'}/out0"


def test_failures_show_what_ran_where_it_differs_from_what_was_submitted(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], run_tag: str
) -> None:
    # Given a worker whose path map sends /mnt/study to this machine's study directory
    study = tmp_path / "study"
    study.mkdir()
    workers("w1", 1, "--path-map", f"/mnt/study={study}")
    cmds = write_commands(
        study / "cmds", [f"{sys.executable} {JOB} x --exit 3 --out /mnt/study/never"]
    )
    # When its command fails
    batch = api.wait(api.submit(cmds, settings=settings).id, settings=settings, timeout=60)
    assert batch.failed == 1
    # Then `failures` (API, --json and the table) shows the argv that ran, beside the submitted
    [failed] = api.failures(batch.batch, settings=settings)
    assert failed.argv[-1] == "/mnt/study/never" and failed.ran is not None
    assert failed.ran[-1] == f"{study}/never"
    env = settings_env(settings, run_tag)
    shown = tbss_queue("failures", batch.batch, "--json", env=env)
    assert json.loads(shown.stdout)[0]["ran"][-1] == f"{study}/never"
    table = tbss_queue("failures", batch.batch, env={**env, "COLUMNS": "400"}).stdout
    assert f"ran: {sys.executable} {JOB} x --exit 3 --out {study}/never" in table


def test_submit_path_map_rewrites_commands_and_directory(
    tmp_path: Path, settings: Settings
) -> None:
    src = tmp_path / "here"
    src.mkdir()
    cmds = write_commands(src / "cmds", [f"touch {src}/a"])
    batch = api.submit(cmds, path_map=PathMap.parse([f"{src}=/cluster/study"]), settings=settings)
    assert batch.cwd == "/cluster/study"
    [task] = api.tasks(batch.id, settings=settings)
    assert task.argv == ("touch", "/cluster/study/a")
