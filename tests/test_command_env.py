"""A command's environment is built from an allowlist: never the worker's secrets (issue 27)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

from tbss_queue import api
from tbss_queue.config import Settings

from .conftest import Worker, settings_env, tbss_queue, write_commands

DUMP = "import json, os; json.dump(dict(os.environ), open('env.json', 'w'))"


def test_a_command_gets_the_allowlist_and_never_the_workers_secrets(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker]
) -> None:
    # Given a worker whose environment holds the broker URL (TBSS_QUEUE_BROKER), a secret of
    # the lab's, FSL's variables, and a variable the operator passes on by name
    fsl = tmp_path / "fsl"
    (fsl / "bin").mkdir(parents=True)
    env = {
        "LAB_API_TOKEN": "lab-secret-token",
        "LAB_LICENSE": "licence-server:27000",
        "FSLDIR": str(fsl),
        "FSLMULTIFILEQUIT": "TRUE",
        "LANG": "C.UTF-8",
    }
    workers("w1", 1, "--allow-any", "--pass-env", "LAB_LICENSE", env=env)
    # When a command dumps its environment
    cmds = write_commands(tmp_path / "cmds", [f'{sys.executable} -c "{DUMP}"'])
    batch = api.submit(cmds, settings=settings)
    assert api.wait(batch.id, settings=settings, timeout=60).succeeded == 1
    got = json.loads((tmp_path / "env.json").read_text())
    # Then it has FSL's, the locale, PATH with $FSLDIR/bin first, the one passed by name...
    assert got["FSLDIR"] == str(fsl) and got["FSLMULTIFILEQUIT"] == "TRUE"
    assert got["FSLOUTPUTTYPE"] == "NIFTI_GZ" and got["LANG"] == "C.UTF-8"
    assert got["PATH"].startswith(f"{fsl}/bin:") and got["LAB_LICENSE"] == "licence-server:27000"
    assert (got["TBSS_QUEUE_BATCH"], got["OMP_NUM_THREADS"]) == (batch.id, "1")
    # ... and no secret: no broker URL, no password, none of tbss-queue's settings
    own = sorted(k for k in got if k.startswith("TBSS_QUEUE_"))
    assert own == [
        "TBSS_QUEUE_ATTEMPT",
        "TBSS_QUEUE_BATCH",
        "TBSS_QUEUE_RUN_TAG",
        "TBSS_QUEUE_TASK",
    ], own
    assert "LAB_API_TOKEN" not in got
    text = json.dumps(got)
    for secret in (settings.broker, "lab-secret-token", "redis://"):
        assert secret not in text


def test_pass_env_refuses_tbss_queues_own_variables(settings: Settings, run_tag: str) -> None:
    res = tbss_queue(
        "worker", "--pass-env", "TBSS_QUEUE_BROKER", env=settings_env(settings, run_tag)
    )
    assert res.returncode == 2, res.stderr
    assert "--pass-env TBSS_QUEUE_BROKER" in res.stderr and "never passed" in res.stderr
