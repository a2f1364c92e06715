"""FSL's own fsl_sub (from PyPI) submitting to tbss-queue through our plugin."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tbss_queue import api
from tbss_queue.config import Settings

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


def test_fsl_sub_task_file_becomes_one_batch_that_workers_complete(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], fsl_sub_env: dict[str, str]
) -> None:
    workers("w1")
    write_commands(
        tmp_path / "cmds.txt", [f"{sys.executable} {JOB} {i} --out out{i}" for i in range(4)]
    )
    # as tbss_2_reg calls it: fsl_sub -l tbss_logs -T 60 -N tbss_2_reg -t .commands
    res = fsl_sub(
        "-l", "logs", "-T", "60", "-N", "name", "-t", "cmds.txt", env=fsl_sub_env, cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr
    batch_id = res.stdout.strip()
    final = api.wait(batch_id, settings=settings, timeout=60)
    assert (final.total, final.succeeded) == (4, 4)
    assert sorted(p.name for p in tmp_path.glob("out*")) == [f"out{i}" for i in range(4)]
    # fsl_sub's log names, task numbers = line numbers
    assert (tmp_path / "logs" / f"name.o{batch_id}.1").exists()
    assert (tmp_path / "logs" / f"name.e{batch_id}.4").exists()
    assert api.tasks(batch_id, settings=settings)[0].argv[-1] == "out0"


def test_fsl_sub_single_command_and_hold_on_a_batch(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], fsl_sub_env: dict[str, str]
) -> None:
    workers("w1", 2)
    write_commands(tmp_path / "first.txt", [f"{sys.executable} {JOB} a --sleep 3 --log order"])
    first = fsl_sub("-t", "first.txt", "-N", "first", env=fsl_sub_env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    # a single command held on the first batch (-j) runs only after it ended
    second = fsl_sub(
        "-j",
        first.stdout.strip(),
        "-N",
        "then",
        sys.executable,
        JOB,
        "b",
        "--log",
        "order",
        env=fsl_sub_env,
        cwd=tmp_path,
    )
    assert second.returncode == 0, second.stderr
    held = second.stdout.strip()
    with pytest.raises(Exception, match="held until"):
        api.status(held, settings=settings)
    api.wait(first.stdout.strip(), settings=settings, timeout=60)
    deadline = time.monotonic() + 60
    while True:
        try:
            final = api.wait(held, settings=settings, timeout=60)
            break
        except Exception:
            assert time.monotonic() < deadline
            time.sleep(0.5)
    assert (final.total, final.succeeded) == (1, 1)
    assert (tmp_path / "order").read_text().split() == ["a", "b"]


def test_plugin_is_registered_for_fsl_sub() -> None:
    from fsl_sub.utils import available_plugins

    assert "tbss_queue" in available_plugins()
