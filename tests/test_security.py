"""The worker is the trust boundary; the broker needs a password; secrets stay secret."""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from tbss_queue import api
from tbss_queue.config import Settings
from tbss_queue.execution.policy import Policy
from tbss_queue.queue.app import TASK_NAME, make_app
from tbss_queue.redis_server import RedisServer, free_port

from .conftest import Worker, settings_env, tbss_queue, write_commands


def fsldir(tmp_path: Path) -> Path:
    (tmp_path / "fsl" / "bin").mkdir(parents=True)
    tool = tmp_path / "fsl" / "bin" / "fsl_reg"
    # a successful fsl_reg as far as outputs go: warp and a two-number score
    tool.write_text('#!/bin/sh\necho warp > "$3"_warp.nii.gz\necho "0.5 0.2" > "$3"_warp.msf\n')
    tool.chmod(0o755)
    return tmp_path / "fsl"


def up_to_root(path: Path) -> str:
    """A relative path from `path` that climbs through a detour to /: ../x/../../.."""
    return "../x/" + "../" * len(path.resolve().parts)


def test_policy_refuses_each_way_around_the_allowlist(tmp_path: Path) -> None:
    fsl = fsldir(tmp_path)
    env = {"PATH": os.environ["PATH"], "FSLDIR": str(fsl)}
    (tmp_path / "fsl_reg").symlink_to("/bin/bash")  # a symlink named like an FSL tool
    p = Policy.build()
    cwd = str(tmp_path)
    assert "interpreter" in p.check(["/bin/sh", "-c", "touch canary"], cwd, env)
    assert "interpreter" in p.check(["./fsl_reg", "-c", "id"], cwd, env)
    assert "not an allowed" in p.check([up_to_root(tmp_path) + "bin/rm", "x"], cwd, env)
    assert "not an allowed" in p.check(["touch", "x"], cwd, env)
    assert "interpreter" in p.check(["python3", "-c", "1"], cwd, env)
    assert p.check([str(fsl / "bin" / "fsl_reg"), "a", "b", "c"], cwd, env) is None
    # an fsl_reg outside this worker's FSLDIR is not FSL's
    other = tmp_path / "other" / "bin"
    other.mkdir(parents=True)
    (other / "fsl_reg").write_text("#!/bin/sh\n")
    (other / "fsl_reg").chmod(0o755)
    assert "not under this worker's FSLDIR" in p.check([str(other / "fsl_reg")], cwd, env)
    # a copy of bash, a hard link to bash or a script, named fsl_reg in the study tree: trusted
    # by where it lives, never by its name; with or without FSLDIR
    planted = tmp_path / "study"
    planted.mkdir()
    shutil.copy2("/bin/bash", planted / "copy")
    try:
        os.link(os.path.realpath("/bin/bash"), planted / "hard")
    except OSError:  # another filesystem: a hard link is then impossible there anyway
        shutil.copy2("/bin/bash", planted / "hard")
    (planted / "script").write_text("#!/bin/sh\ntouch canary\n")
    (planted / "script").chmod(0o755)
    no_fsl = {"PATH": os.environ["PATH"]}
    for kind in ("copy", "hard", "script"):
        (planted / kind).rename(planted / "fsl_reg")
        why = p.check(["./fsl_reg", "-c", "id"], str(planted), env)
        assert why is not None and "not under this worker's FSLDIR" in why, (kind, why)
        why = p.check(["./fsl_reg", "-c", "id"], str(planted), no_fsl)
        assert why is not None and "FSLDIR" in why and "--allow" in why, (kind, why)
        (planted / "fsl_reg").rename(planted / kind)
    # even FSL's own fsl_reg needs FSLDIR (or --allow PATH) on the worker
    assert "has none" in p.check([str(fsl / "bin" / "fsl_reg")], cwd, no_fsl)
    allowed = Policy.build([str(fsl / "bin" / "fsl_reg")])
    assert allowed.check([str(fsl / "bin" / "fsl_reg")], cwd, no_fsl) is None
    # explicit allows, by name or path; a pattern never lets an interpreter in
    assert Policy.build(["touch"]).check(["touch", "x"], cwd, env) is None
    assert Policy.build(["python3"]).check(["python3", "-c", "1"], cwd, env) is None
    assert Policy.build(["*"]).check(["bash", "-c", "id"], cwd, env) is not None
    assert Policy.build(allow_any=True).check(["bash", "-c", "id"], cwd, env) is None
    # --root
    inside = Policy.build(["touch"], roots=[str(tmp_path / "fsl")])
    assert "outside this worker's --root" in inside.check(["touch", "x"], cwd, env)


def test_a_real_worker_refuses_and_nothing_runs(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker]
) -> None:
    # Given a worker with the default allowlist, FSL in fsl/, allowed to `touch`, rooted in study/
    fsl = fsldir(tmp_path)
    study, outside = tmp_path / "study", tmp_path / "outside"
    study.mkdir()
    outside.mkdir()
    (study / "fsl_reg").symlink_to("/bin/bash")
    (study / "keep").write_text("canary: must survive rm")
    workers("w1", 2, "--allow", "touch", "--root", str(study), env={"FSLDIR": str(fsl)})
    bad = write_commands(
        study / "bad",
        [
            "/bin/sh -c 'touch canary_sh'",
            f"{up_to_root(study)}bin/rm keep",
            "./fsl_reg -c 'touch canary_link'",
            "mkdir canary_mkdir",
            f'{sys.executable} -c \'open("canary_py", "w")\'',
        ],
    )
    good = write_commands(study / "good", ["touch ok", f"{fsl}/bin/fsl_reg a b pair"])
    elsewhere = write_commands(outside / "cmds", ["touch canary_outside"])
    # When they are submitted
    ids = [api.submit(f, settings=settings).id for f in (bad, good, elsewhere)]
    results = [api.wait(i, settings=settings, timeout=60) for i in ids]
    # Then every bad one is refused with a reason, the good ones ran, no canary exists
    assert [(r.failed, r.succeeded) for r in results] == [(5, 0), (0, 2), (1, 0)]
    for batch_id in (ids[0], ids[2]):
        for f in api.failures(batch_id, settings=settings):
            assert f.cause == "refused" and f.message.startswith("refused: ")
    assert (study / "ok").exists() and (study / "pair_warp.msf").exists()
    assert (study / "keep").exists()
    leftovers = [
        p.name for p in [*study.iterdir(), *outside.iterdir()] if p.name.startswith("canary")
    ]
    assert leftovers == []


def test_a_pickle_message_pushed_into_the_queue_is_rejected(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker]
) -> None:
    # Given a real batch whose JSON message is replaced by a pickled one with the same task
    cmds = write_commands(tmp_path / "c", ["touch canary_pickle"])
    batch = api.submit(cmds, settings=settings)
    client = redis.Redis.from_url(settings.broker)
    client.delete(settings.queue)
    [task] = api.tasks(batch.id, settings=settings)
    make_app(settings).send_task(
        TASK_NAME,
        args=(batch.id, list(task.argv), str(tmp_path)),
        task_id=task.task_id,
        serializer="pickle",
    )
    assert client.llen(settings.queue) == 1
    # When a worker (allowed to run touch) reads the queue
    w = workers("w1", 1, "--allow", "touch")
    deadline = time.monotonic() + 20
    while client.llen(settings.queue) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1)
    # Then the message was refused and nothing ran
    assert client.llen(settings.queue) == 0
    assert "pickle" in w.log.read_text() and "untrusted content" in w.log.read_text()
    assert not (tmp_path / "canary_pickle").exists()
    assert api.status(batch.id, settings=settings).queued == 1


@pytest.fixture
def protected(tmp_path: Path) -> tuple[RedisServer, str]:
    password = "pw-" + os.urandom(8).hex()
    server = RedisServer(
        tmp_path / "redis", port=free_port(), persistent=False, password=password
    ).start()
    yield server, password
    server.stop()


def test_password_protected_broker(
    tmp_path: Path,
    protected: tuple[RedisServer, str],
    workers: Callable[..., Worker],
    run_tag: str,
    settings: Settings,
) -> None:
    server, password = protected
    good_env = {**settings_env(settings, run_tag), "TBSS_QUEUE_BROKER": server.url}
    bad_url = server.url.replace(password, "wrong-password")
    cmds = write_commands(tmp_path / "c", ["touch out"])
    outputs = []
    # right credentials: worker, submit and status work
    w = workers("w1", 1, env={"TBSS_QUEUE_BROKER": server.url})
    res = tbss_queue("submit", str(cmds), "--wait", env=good_env)
    outputs += [res.stdout, res.stderr]
    assert res.returncode == 0, res.stderr
    res = tbss_queue("status", "--json", env=good_env)
    outputs += [res.stdout, res.stderr]
    assert res.returncode == 0 and '"succeeded": 1' in res.stdout
    # wrong or missing credentials: one clear line, non-zero exit, for every command
    for url in (bad_url, server.url.replace(f":{password}@", "")):
        for args in (["submit", str(cmds)], ["status"], ["worker", "--allow-any"]):
            res = tbss_queue(*args, env={**good_env, "TBSS_QUEUE_BROKER": url}, timeout=60)
            outputs += [res.stdout, res.stderr]
            assert res.returncode == 3, (args, res.stderr)
            [line] = res.stderr.strip().splitlines()
            assert line.startswith("tbss-queue: error: broker redis://") and (
                "credentials" in line or "password" in line or "NOAUTH" in line
            ), line
    # the password appears in no output and no log
    logs = [p.read_text(errors="replace") for p in tmp_path.glob("*.log")] + [w.log.read_text()]
    assert password not in "\n".join(outputs + logs)
