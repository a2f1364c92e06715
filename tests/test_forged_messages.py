"""The worker is the trust boundary: forged task messages at a real worker change nothing
outside its --root.

Whoever holds the Redis password can rewrite a queued message. Here hypothesis draws forged
fields (log locations, names, line numbers, working directories, options), the queued messages
of a real batch are rewritten with them, and a real worker takes them: every command must end
(run, or refused with the field named), and no file outside the study may change.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, Phase, example, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from tbss_queue import api
from tbss_queue.config import Settings

from .conftest import Worker, write_commands

pytestmark = pytest.mark.slow

N = 8  # commands per example


def snapshot(root: Path, skip: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under root except `skip`'s tree: (mode, size, mtime_ns), symlinks unfollowed."""
    seen = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == skip or skip in Path(dirpath).parents:
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            if Path(dirpath, name) == skip:
                continue
            st_ = os.lstat(os.path.join(dirpath, name))
            seen[os.path.join(dirpath, name)] = (st_.st_mode, st_.st_size, st_.st_mtime_ns)
    return seen


def forged(study: Path, outside: Path) -> st.SearchStrategy[dict[str, Any]]:
    paths = st.sampled_from(
        [
            "logs",
            "../outside",
            "../../",
            "link",
            "link/deeper",
            str(outside),
            "/etc",
            "logs/../../outside",
            "",
            ".",
        ]
    )
    names = st.one_of(
        st.sampled_from(["j", "../x", "a/b", "..", ".", "victim", "x\x00y", ""]), st.text()
    )
    lines = st.one_of(
        st.integers(-5, 10**9), st.sampled_from(["x/../victim.txt", "1", None]), st.floats()
    )
    cwds = st.sampled_from(
        [str(study), str(outside), f"{study}/../outside", "/", f"{study}/link", "relative"]
    )
    return st.fixed_dictionaries(
        {},
        optional={
            "log_dir": paths,
            "job_name": names,
            "line": lines,
            "cwd": cwds,
            "done_if_exists": st.sampled_from(["../outside/canary", "/etc/passwd", "x", "*"]),
            "time_limit": st.one_of(st.floats(allow_nan=False), st.integers(), st.text()),
            "retries": st.one_of(st.integers(-3, 1000), st.booleans()),
            "shell": st.just("/bin/sh"),
        },
    )


def rewrite_queue(client: redis.Redis, queue: str, forgeries: list[dict[str, Any]]) -> int:
    """Rewrite every queued message's fields with one forgery each; returns how many."""
    raws = client.lrange(queue, 0, -1)
    out = []
    for raw, forgery in zip(raws, forgeries, strict=False):
        message = json.loads(raw)
        # a forger may write either body form kombu reads: plain JSON text or base64
        encoded = message["properties"].get("body_encoding") == "base64"
        body = base64.b64decode(message["body"]) if encoded else message["body"]
        args, kwargs, embed = json.loads(body)
        kwargs = {**kwargs, **{k: v for k, v in forgery.items() if k != "cwd"}}
        if "cwd" in forgery:
            args[3] = forgery["cwd"]
        text = json.dumps([args, kwargs, embed])
        message["body"] = base64.b64encode(text.encode()).decode() if encoded else text
        out.append(json.dumps(message))
    with client.pipeline(transaction=True) as pipe:
        pipe.delete(queue)
        if out:
            pipe.rpush(queue, *out)
        pipe.execute()
    return len(out)


@pytest.fixture
def sandbox(tmp_path: Path) -> tuple[Path, Path, Path]:
    """sandbox/study (the worker's --root, holding a symlink to outside and symlinked log
    names) and sandbox/outside with a canary."""
    box = tmp_path / "sandbox"
    study, outside = box / "study", box / "outside"
    study.mkdir(parents=True)
    outside.mkdir()
    (outside / "canary").write_text("must survive\n")
    (study / "link").symlink_to(outside)
    (study / "logs").mkdir()
    return box, study, outside


def test_forged_message_fields_change_nothing_outside_the_root(
    sandbox: tuple[Path, Path, Path], settings: Settings, workers: Callable[..., Worker]
) -> None:
    box, study, outside = sandbox
    client = redis.Redis.from_url(settings.broker)
    runs = iter(range(1000))

    known = [  # the report's forgeries, always tried first
        {"log_dir": "../outside"},
        {"log_dir": "link"},
        {"log_dir": str(outside)},
        {"job_name": "../../outside/x"},
        {"line": "x/../victim.txt"},
        {"log_dir": "logs/../../outside"},
        {"cwd": str(outside), "log_dir": "."},
        {"job_name": "victim"},  # planted as a symlink to the canary
    ]

    @hsettings(
        max_examples=4,
        deadline=None,
        # each example runs a real worker: report a failing example as drawn, unshrunk
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @example(known)
    @given(st.lists(forged(study, outside), min_size=N, max_size=N))
    def check(forgeries: list[dict[str, Any]]) -> None:
        # Given a queued batch of N commands whose messages an attacker rewrote
        run = next(runs)
        for name in ("j", "victim", "x"):  # log names planted as symlinks to the canary
            for stream in ("o", "e"):
                target = study / "logs" / f"{name}.{stream}"
                if not target.is_symlink():
                    target.symlink_to(outside / "canary")
        before = snapshot(box, study)
        cmds = write_commands(study / f"cmds{run}", [f"touch done_{run}_{i}" for i in range(N)])
        batch = api.submit(cmds, log_dir="logs", job_name="j", settings=settings)
        assert rewrite_queue(client, settings.queue, forgeries) == N
        # When a real worker, rooted in the study, takes them
        w = workers(f"w{run}", 2, "--allow", "touch", "--root", str(study))
        try:
            final = api.wait(batch.id, settings=settings, timeout=60)
        finally:
            w.stop()
        # Then every command ended (ran, or refused naming a field or the root), and nothing
        # outside the study changed
        assert (final.queued, final.running) == (0, 0)
        for failure in api.failures(batch.id, settings=settings):
            # refused naming the field or the root; or, for a forged but valid time limit or
            # marker, honoured as the batch's own would be
            assert failure.cause in ("refused", "no-cwd", "timeout", "missing output"), failure
        assert snapshot(box, study) == before
        assert (outside / "canary").read_text() == "must survive\n"

    check()
