"""The pilot job under a real Slurm (one node the suite starts), with each process-tracking
plugin: it drains before its wall time with no command killed, and `scancel` hands running
commands back to the queue at once."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tbss_queue import api
from tbss_queue.config import Settings
from tbss_queue.execution.procs import kill_tagged, tagged

from .conftest import Worker, settings_env, tbss_queue, write_commands
from .faults import Markers, job, wait_until
from .slurm_cluster import INSTALL, SlurmCluster, missing, slurm_cluster

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["linuxproc", "cgroup"])
def slurm(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SlurmCluster]:
    """A single-node Slurm with proctrack/linuxproc (Slurm's default) or proctrack/cgroup."""
    lacking = missing()
    if lacking:  # fail, don't skip: like redis-server, the suite needs it
        pytest.fail(f"{', '.join(lacking)} not installed: {INSTALL}")
    with slurm_cluster(tmp_path_factory.mktemp(f"slurm-{request.param}"), request.param) as c:
        print(f"slurm with proctrack/{request.param} up in {c.setup_seconds:.1f} s")
        yield c


def pilot(tmp_path: Path, *options: str) -> Path:
    """`tbss-queue slurm-script` as a user runs it, written to pilot.sbatch."""
    res = tbss_queue("slurm-script", "--nodes", "1", "--mem-per-cpu", "100M", *options)
    assert res.returncode == 0, res.stderr
    script = tmp_path / "pilot.sbatch"
    script.write_text(res.stdout)
    return script


def job_env(tmp_path: Path, settings: Settings, tag: str) -> dict[str, str]:
    """The submitter's environment: the broker, and `tbss-queue` on PATH. The stand-in commands
    are Python scripts, which a worker's default policy refuses, hence --allow-any."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    wrapper = bindir / "tbss-queue"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m tbss_queue "$@" --allow-any\n')
    wrapper.chmod(0o755)
    env = settings_env(settings, tag)
    return {**env, "PATH": f"{bindir}:{env['PATH']}"}


def ended(slurm: SlurmCluster, job_id: str) -> bool:
    return slurm.job_state(job_id) not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING")


def test_pilot_job_drains_before_its_wall_time_with_no_command_killed(
    slurm: SlurmCluster, settings: Settings, tmp_path: Path, run_tag: str
) -> None:
    # Given: 16 commands of 5 s, and a 2-minute pilot job on 2 CPUs whose --expected (40 s)
    # leaves 120 - 40 - 60 = 20 s to take commands
    marks = Markers(tmp_path / "marks")
    cmds = write_commands(
        tmp_path / "cmds",
        [
            job(f"c{i:02}", tmp_path / "ran", "--sleep 5", f"--marker {marks.dir}")
            for i in range(16)
        ],
    )
    batch = api.submit(cmds, settings=settings)
    script = pilot(tmp_path, "--time", "00:02:00", "--cpus-per-node", "2", "--expected", "40s")
    assert "#SBATCH --signal" not in script.read_text()
    try:
        # When: Slurm runs it
        job_id = slurm.sbatch(script, cwd=tmp_path, env=job_env(tmp_path, settings, run_tag))
        wait_until(lambda: ended(slurm, job_id), timeout=110, what="the pilot job to end")
        # Then: it ended by itself, before its wall time ...
        log = (tmp_path / f"tbss-queue-pilot-{job_id}.log").read_text()
        assert slurm.job_state(job_id) == "COMPLETED", log
        # ... every command that started completed, in the process that started it ...
        started = marks.ids()
        assert len(started) >= 4, log
        for cid in started:
            (start,), dones = marks.starts(cid), marks.dones(cid)
            assert [d.pid for d in dones] == [start.pid], f"{cid} was killed: {marks.of(cid)}"
        # ... including those that were running when the node stopped taking commands
        assert "succeeded" in log.split("stop-after reached")[1], log
        # ... none failed, and the commands it never started wait in the queue
        st = api.status(batch.id, settings=settings)
        assert (st.succeeded, st.failed, st.running) == (len(started), 0, 0)
        assert st.queued == 16 - len(started) > 0
        assert "handing running commands back" not in log
    finally:
        kill_tagged(run_tag)


def test_scancel_hands_running_commands_back_at_once(
    slurm: SlurmCluster,
    settings: Settings,
    tmp_path: Path,
    run_tag: str,
    workers: Callable[..., Worker],
) -> None:
    # Given: a pilot job on 2 CPUs running two 8 s commands
    marks = Markers(tmp_path / "marks")
    cmds = write_commands(
        tmp_path / "cmds",
        [job(f"c{i}", tmp_path / "ran", "--sleep 8", f"--marker {marks.dir}") for i in range(2)],
    )
    batch = api.submit(cmds, settings=settings)
    script = pilot(tmp_path, "--time", "00:20:00", "--cpus-per-node", "2")
    job_id = slurm.sbatch(script, cwd=tmp_path, env=job_env(tmp_path, settings, run_tag))
    wait_until(lambda: len(marks.ids()) == 2, timeout=60, what="both commands to start")
    # (the plugin is the one configured: only proctrack/cgroup puts the commands in a cgroup)
    commands = {m.pid for c in ("c0", "c1") for m in marks.starts(c)}
    assert (commands <= slurm.cgroup_pids(job_id)) == (slurm.proctrack == "cgroup")
    # When: the user cancels the job
    cancelled = time.monotonic()
    slurm.run("scancel", job_id)
    # Then: both are back in the queue within seconds, not after Slurm's KillWait (30 s) ...
    log = tmp_path / f"tbss-queue-pilot-{job_id}.log"
    try:
        wait_until(lambda: api.status(batch.id, settings=settings).queued == 2, timeout=25)
    except AssertionError:
        st = api.status(batch.id, settings=settings)
        raise AssertionError(f"not handed back: {st}\n{log.read_text()}") from None
    handed_back = time.monotonic() - cancelled
    print(f"proctrack/{slurm.proctrack}: handed back {handed_back:.1f} s after scancel")
    assert handed_back < 10
    st = api.status(batch.id, settings=settings)
    assert (st.running, st.failed, st.succeeded) == (0, 0, 0)
    # ... the worker and its commands are gone on their own, before Slurm's SIGKILL
    wait_until(lambda: not tagged(run_tag), timeout=slurm.kill_wait - 10, what="the pilot to exit")
    wait_until(lambda: ended(slurm, job_id), timeout=10, what="the job to end")
    assert slurm.job_state(job_id) == "CANCELLED"
    # ... and another node runs each of them once more, to completion; none failed
    workers("after", 2)
    final = api.wait(batch.id, settings=settings, timeout=60)
    assert (final.succeeded, final.failed) == (2, 0)
    assert marks.counts(["c0", "c1"]) == {"c0": (2, 1), "c1": (2, 1)}
