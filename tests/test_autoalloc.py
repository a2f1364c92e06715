"""Elastic pilots (issue 25): the manager's decision in milliseconds, then `tbss-queue
autoalloc` against the real single-node Slurm the suite starts, with real workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tbss_queue import api
from tbss_queue.autoalloc import (
    STATE,
    PartitionView,
    backoff_delay,
    decide,
    pilot_notes,
    pilots_needed,
)
from tbss_queue.config import Settings
from tbss_queue.execution.procs import kill_tagged
from tbss_queue.queue.broker import connect

from .conftest import tbss_queue
from .faults import Markers, job, wait_until
from .slurm_cluster import INSTALL, SlurmCluster, missing, slurm_cluster
from .test_slurm import job_env

# -- the decision, no Slurm ----------------------------------------------------------------------


def test_nothing_is_submitted_while_nothing_waits() -> None:
    # Given: an empty queue and room for pilots; When/Then: none is asked for
    assert decide(0, 24, [PartitionView("a")], max_pilots=4, backlog=4) == {"a": 0}
    assert pilots_needed(0, 24) == 0


def test_enough_pilots_for_the_work_within_max_pilots_and_backlog() -> None:
    # 200 commands, 24 per pilot within its wall time: 9 pilots wanted
    assert pilots_needed(200, 24) == 9
    assert decide(200, 24, [PartitionView("a")], max_pilots=4, backlog=8) == {"a": 4}
    assert decide(200, 24, [PartitionView("a")], max_pilots=20, backlog=2) == {"a": 2}
    # pilots already pending or running count, whether pending or running
    assert decide(200, 24, [PartitionView("a", 1, 2)], max_pilots=4, backlog=2) == {"a": 1}
    assert decide(30, 24, [PartitionView("a", 0, 2)], max_pilots=4, backlog=2) == {"a": 0}
    assert decide(200, 24, [PartitionView("a", 2, 0)], max_pilots=9, backlog=2) == {"a": 0}


def test_work_spills_to_the_next_partition_and_a_blocked_one_takes_none() -> None:
    views = [PartitionView("a", 0, 2), PartitionView("b")]
    assert decide(100, 24, views, max_pilots=2, backlog=4) == {"a": 0, "b": 2}
    assert decide(100, 24, views, max_pilots=4, backlog=4) == {"a": 2, "b": 1}
    views = [PartitionView("a", blocked=True), PartitionView("b")]
    assert decide(30, 24, views, max_pilots=4, backlog=4) == {"a": 0, "b": 2}


def test_backoff_doubles_up_to_its_cap() -> None:
    assert [backoff_delay(n, 30, 200) for n in (1, 2, 3, 4)] == [30, 60, 120, 200]


def test_status_lines_say_the_pilots_and_why_none_is_submitted() -> None:
    parts = {"compute": {"pending": 1, "running": 3}}
    state = {"partitions": json.dumps(parts), "updated": "1000", "interval": "30"}
    assert pilot_notes({}) == []
    assert pilot_notes(state, now=1010) == ["pilots (autoalloc): compute 1 pending, 3 running"]
    failing = {**state, "error": "compute: sbatch failed: invalid partition"}
    assert pilot_notes(failing, now=1010)[1] == (
        "autoalloc submits no pilot: compute: sbatch failed: invalid partition"
    )
    assert "is `tbss-queue autoalloc` running?" in pilot_notes(state, now=2000)[1]


# -- the manager under a real Slurm --------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """test_slurm's single-node Slurm (proctrack/linuxproc: pilots only need jobs to run)."""
    lacking = missing()
    if lacking:
        pytest.fail(f"{', '.join(lacking)} not installed: {INSTALL}")
    with slurm_cluster(tmp_path_factory.mktemp("slurm-autoalloc"), "linuxproc") as c:
        yield c


class Autoalloc:
    """`tbss-queue autoalloc` in a subprocess, with Slurm's client commands at hand."""

    def __init__(self, slurm: SlurmCluster, settings: Settings, env: dict[str, str]) -> None:
        self.slurm, self.env = slurm, env
        self.r: redis.Redis = connect(settings)
        self.name = f"tq-auto-{os.urandom(4).hex()}"
        self.proc: subprocess.Popen[str] | None = None

    def start(self, tmp_path: Path, *options: str) -> Autoalloc:
        argv = [sys.executable, "-m", "tbss_queue", "autoalloc", "--job-name", self.name]
        argv += ["--mem-per-cpu", "100M", "--dir", str(tmp_path), "--allow-any", *options]
        self.log = tmp_path / "autoalloc.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)
        self.slurm.run("scancel", "--name", self.name, "--signal=KILL", "--full", check=False)

    def jobs(self) -> dict[str, str]:
        """job id -> state, of the pilots Slurm lists as pending or running."""
        out = self.slurm.run("squeue", "-h", "-n", self.name, "-o", "%i %T")
        return dict(line.split() for line in out.splitlines())

    def state(self) -> dict[str, str]:
        return {str(k): str(v) for k, v in self.r.hgetall(STATE).items()}

    def ticks(self) -> int:
        return int(self.state().get("ticks", 0))

    def wait_ticks(self, n: int, timeout: float = 60) -> None:
        """Wait for the manager to look at the queue and Slurm `n` more times."""
        target = self.ticks() + n
        wait_until(lambda: self.ticks() >= target, timeout=timeout, what=f"{n} ticks")

    def text(self) -> str:
        return self.log.read_text()


@pytest.fixture
def autoalloc(
    slurm: SlurmCluster, settings: Settings, tmp_path: Path, run_tag: str
) -> Iterator[Callable[..., Autoalloc]]:
    made: list[Autoalloc] = []
    env = {**job_env(tmp_path, settings, run_tag), "SLURM_CONF": slurm.env["SLURM_CONF"]}

    def start(*options: str) -> Autoalloc:
        made.append(Autoalloc(slurm, settings, env).start(tmp_path, *options))
        return made[-1]

    try:
        yield start
    finally:
        for a in made:
            a.stop()
        kill_tagged(run_tag)


@pytest.mark.slow
def test_pilots_come_with_the_work_and_go_with_it(
    autoalloc: Callable[..., Autoalloc], settings: Settings, tmp_path: Path
) -> None:
    # Given: a manager with nothing to do: it submits nothing
    manager = autoalloc(
        "--time", "00:03:00", "--expected", "10s", "--idle", "5s", "--cpus-per-node", "2",
        "--max-pilots", "2", "--backlog", "2", "--interval", "1",
    )  # fmt: skip
    manager.wait_ticks(3)
    assert manager.jobs() == {} and int(manager.state()["submitted"]) == 0
    # When: 200 short commands arrive
    marks = Markers(tmp_path / "marks")
    ids = [f"c{i:03}" for i in range(200)]
    cmds = tmp_path / "cmds"
    cmds.write_text("\n".join(job(i, tmp_path / "ran", f"--marker {marks.dir}") for i in ids))
    batch = api.submit(cmds, settings=settings)
    began = time.monotonic()
    # Then: pilots are submitted, within --max-pilots, and run every command once
    wait_until(lambda: manager.jobs() != {}, timeout=30, what="a pilot to be submitted")
    first_pilot = time.monotonic() - began
    final = api.wait(batch.id, settings=settings, timeout=240)
    all_done = time.monotonic() - began
    assert (final.succeeded, final.failed) == (200, 0), manager.text()
    marks.assert_exactly_once(ids)
    submitted = int(manager.state()["submitted"])
    assert 1 <= submitted <= 4, manager.text()
    # ... the pilots end on their own once idle, freeing their allocations ...
    wait_until(lambda: manager.jobs() == {}, timeout=60, what="the pilots to end when idle")
    print(
        f"200 commands: first pilot after {first_pilot:.1f} s, all done after {all_done:.1f} s, "
        f"{submitted} pilots, all ended after {time.monotonic() - began:.1f} s"
    )
    manager.wait_ticks(2)
    state = manager.state()
    assert int(state.get("ended:COMPLETED", 0)) == submitted, manager.text()
    for log in tmp_path.glob("tbss-queue-pilot-*.log"):
        assert "idle for 5 s: taking no new commands" in log.read_text(), log.read_text()
    # ... and while the queue stays empty, none is submitted
    manager.wait_ticks(5)
    assert manager.jobs() == {}
    assert int(manager.state()["submitted"]) == submitted


@pytest.mark.slow
def test_a_cancelled_pilot_is_replaced_and_its_commands_run_again_once(
    autoalloc: Callable[..., Autoalloc], slurm: SlurmCluster, settings: Settings, tmp_path: Path
) -> None:
    # Given: one pilot (at most) on 2 CPUs, running two 8 s commands
    manager = autoalloc(
        "--time", "00:05:00", "--expected", "20s", "--idle", "5s", "--cpus-per-node", "2",
        "--max-pilots", "1", "--backlog", "1", "--interval", "1",
    )  # fmt: skip
    marks = Markers(tmp_path / "marks")
    ids = ["c0", "c1"]
    cmds = tmp_path / "cmds"
    cmds.write_text(
        "\n".join(job(i, tmp_path / "ran", "--sleep 8", f"--marker {marks.dir}") for i in ids)
    )
    batch = api.submit(cmds, settings=settings)
    wait_until(lambda: len(marks.ids()) == 2, timeout=60, what="both commands to start")
    (first,) = manager.jobs()
    # (seen: `status` counts the pilot per partition, `nodes` names its worker by its job id)
    env = manager.env
    wait_until(
        lambda: (
            "pilots (autoalloc): default 0 pending, 1 running"
            in tbss_queue("status", env=env).stdout
        ),
        timeout=30,
        what="status to count the running pilot",
    )
    listed = tbss_queue("nodes", env=env).stdout
    assert f"slurm{first}@" in listed and "default 0 pending, 1 running" in listed, listed
    # When: the user (or Slurm) cancels the pilot mid-command
    slurm.run("scancel", first)
    # Then: the manager says how it ended and submits another pilot ...
    wait_until(
        lambda: set(manager.jobs()) - {first} != set(), timeout=60, what="a replacement pilot"
    )
    assert f"pilot {first} ended: CANCELLED" in manager.text()
    # ... which runs each command again, once, to completion; none failed
    final = api.wait(batch.id, settings=settings, timeout=120)
    assert (final.succeeded, final.failed) == (2, 0), manager.text()
    assert marks.counts(ids) == {"c0": (2, 1), "c1": (2, 1)}
    assert int(manager.state()["submitted"]) == 2


@pytest.mark.slow
def test_a_wrong_partition_backs_off_with_one_clear_message(
    autoalloc: Callable[..., Autoalloc], settings: Settings, tmp_path: Path
) -> None:
    # Given: work waiting, and a manager told of a partition Slurm does not have, ticking
    # every 0.2 s, whose sbatch waits 1 s after a first failure, doubled up to 4 s
    cmds = tmp_path / "cmds"
    cmds.write_text("\n".join(job(i, tmp_path / "ran") for i in range(3)))
    api.submit(cmds, settings=settings)
    manager = autoalloc(
        "--partition", "nosuch", "--time", "00:05:00", "--expected", "20s",
        "--interval", "0.2", "--retry-after", "1", "--max-backoff", "4",
    )  # fmt: skip
    # When: it has looked at the queue some 40 times (8 s or more)
    manager.wait_ticks(40)
    # Then: sbatch was tried a few times, not 40: after 1, 2, 4, 4 s ...
    log = manager.text()
    tries = [line for line in log.splitlines() if "sbatch failed" in line]
    assert 2 <= len(tries) <= 5, log
    waits = [line.split("next try in ")[1] for line in tries]
    assert waits[:3] == ["1 s)", "2 s)", "4 s)"], log
    # ... each a single line that names the partition and Slurm's reason ...
    assert all("nosuch: sbatch failed: invalid partition" in t.lower() for t in tries), log
    assert manager.jobs() == {}
    # ... which `status` shows too
    res = subprocess.run(
        [sys.executable, "-m", "tbss_queue", "status"],
        capture_output=True, text=True, env=manager.env, timeout=60,
    )  # fmt: skip
    said = [line for line in res.stdout.splitlines() if "autoalloc submits no pilot" in line]
    assert len(said) == 1 and "nosuch" in said[0] and "invalid partition" in said[0].lower(), (
        res.stdout
    )


@pytest.mark.slow
def test_pilots_that_fail_before_their_worker_connects_back_off(
    autoalloc: Callable[..., Autoalloc], settings: Settings, tmp_path: Path
) -> None:
    # Given: work waiting, and pilots whose worker cannot start (its --allow-file is missing)
    cmds = tmp_path / "cmds"
    cmds.write_text("\n".join(job(i, tmp_path / "ran") for i in range(3)))
    api.submit(cmds, settings=settings)
    manager = autoalloc(
        "--time", "00:05:00", "--expected", "20s", "--interval", "0.2",
        "--retry-after", "2", "--max-backoff", "60", "--allow-file", str(tmp_path / "missing"),
    )  # fmt: skip
    # When: the first pilots have failed
    wait_until(lambda: "failure 2;" in manager.text(), timeout=90, what="two failed pilots")
    manager.wait_ticks(10)
    # Then: each failure says which pilot and where its log is, and the waits double
    log = manager.text()
    failed = [line for line in log.splitlines() if "before its worker connected" in line]
    assert [line.split("next try in ")[1] for line in failed[:2]] == ["2 s)", "4 s)"], log
    assert "tbss-queue-pilot-" in failed[0] and str(tmp_path) in failed[0]
    # ... and pilots were submitted one at a time, after each wait, not one per tick
    assert int(manager.state()["submitted"]) <= 3, log
