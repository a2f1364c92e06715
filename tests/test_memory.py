"""Memory as a node's capacity (issue 24), on real limits: worker nodes in memory cgroups of
their own (tests/cgroups.py), a real redis-server, real `tbss-queue worker` processes, and
commands that really hold the memory they claim (tests/bin/job.py --alloc).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tbss_queue import api
from tbss_queue.config import Settings
from tbss_queue.execution.resources import THREAD_VARS
from tbss_queue.sizes import human

from .cgroups import MemoryCgroup, memory_cgroup
from .conftest import Worker, settings_env, tbss_queue, write_commands
from .faults import Markers, job, wait_until

pytestmark = pytest.mark.slow

MiB = 2**20


@pytest.fixture
def cgroups() -> Iterator[Callable[[int], MemoryCgroup]]:
    """Factory: cgroups(limit) makes a child memory cgroup; all removed afterwards, their
    processes killed (torn down before `workers`, which this test requests first)."""
    with ExitStack() as stack:
        yield lambda limit: stack.enter_context(memory_cgroup(limit))


def most_at_once(marks: Markers, ids: list[str]) -> int:
    """The most commands that held their memory at the same moment (start..done)."""
    edges = sorted((m.time, 1 if m.kind == "start" else -1) for i in ids for m in marks.of(i))
    now = top = 0
    for _, step in edges:
        now += step
        top = max(top, now)
    return top


def test_a_node_of_1_gib_runs_commands_of_300_mb_at_most_3_at_once_none_killed(
    tmp_path: Path,
    settings: Settings,
    workers: Callable[..., Worker],
    cgroups: Callable[[int], MemoryCgroup],
    run_tag: str,
) -> None:
    cli_env = settings_env(settings, run_tag)
    # Given a node with 4 slots in a memory cgroup of 1 GiB, and no --mem: its budget is the
    # cgroup's limit
    group = cgroups(1024 * MiB)
    w1 = workers("w1", 4, wrap=group.wrap)
    [node] = api.nodes(settings=settings)
    assert node.facts["mem_budget"] == 1024 * MiB and node.facts["slots"] == 4
    listed = tbss_queue("nodes", env=cli_env)
    assert listed.returncode == 0 and "4 slots, 1 GiB" in listed.stdout, listed.stdout
    # When 8 commands that each hold 256 MiB for a second are queued, each asking 300 MiB
    marks, log = Markers(tmp_path / "marks"), tmp_path / "log"
    ids = [str(i) for i in range(8)]
    lines = [job(i, log, "--marker", str(marks.dir), "--alloc", "256", "--sleep", "1") for i in ids]
    batch = api.submit(write_commands(tmp_path / "cmds", lines), mem=300 * MiB, settings=settings)
    final = api.wait(batch.id, settings=settings, timeout=120)
    # Then every one completed once, none was killed, and never more than 3 held memory at once
    assert (final.succeeded, final.failed, final.requeued) == (8, 0, 0), final
    marks.assert_exactly_once(ids)
    assert group.oom_kills() == 0
    assert 1 <= most_at_once(marks, ids) <= 3
    # and each attempt's record names the peak of its whole process tree
    peaks = [t.to_dict().get("peak_rss") for t in api.tasks(batch.id, settings=settings)]
    assert all(p is not None and 256 * MiB <= p < 400 * MiB for p in peaks), peaks
    # and status --json and the report give the batch's largest
    as_json = json.loads(tbss_queue("status", batch.id, "--json", env=cli_env).stdout)
    assert as_json["peak_rss"] == max(peaks)
    assert api.report(batch.id, settings=settings)["summary"]["peak_rss"] == max(peaks)
    assert w1.proc.poll() is None


def test_a_command_that_does_not_fit_waits_then_goes_back_unclaimed_and_runs_once(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker]
) -> None:
    # Given a node of 1 GiB and 2 slots, and two commands asking 600 MiB each: one runs and
    # holds on until told, the other cannot fit beside it
    w1 = workers("w1", 2, "--mem", "1G")
    marks, log, go = Markers(tmp_path / "marks"), tmp_path / "log", tmp_path / "go"
    ids = ["a", "b"]
    lines = [job(i, log, "--marker", str(marks.dir), "--until-file", str(go)) for i in ids]
    batch = api.submit(write_commands(tmp_path / "cmds", lines), mem=600 * MiB, settings=settings)
    # When the other has waited its while (2 x LOST_AFTER) on the node
    wait_until(lambda: len(marks.ids()) == 1, what="one command started")
    wait_until(lambda: "waited in vain" in w1.log.read_text(), timeout=30, what="a give-back")
    assert len(marks.ids()) == 1
    # Then it went back to the queue unclaimed; once the first ends, it runs, once
    go.touch()
    final = api.wait(batch.id, settings=settings, timeout=60)
    assert (final.succeeded, final.failed, final.requeued) == (2, 0, 0), final
    marks.assert_exactly_once(ids)
    assert most_at_once(marks, ids) == 1
    # and neither was claimed before it ran: each ran as its first attempt
    assert [t.attempt for t in api.tasks(batch.id, settings=settings)] == [1, 1]


def test_a_command_of_n_threads_takes_n_slots_with_the_thread_variables_set(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker]
) -> None:
    # Given a node of 2 slots
    workers("w1", 2)
    # When 3 commands of 2 threads each are queued
    marks, log = Markers(tmp_path / "marks"), tmp_path / "log"
    ids = [str(i) for i in range(3)]
    lines = [
        job(i, log, "--marker", str(marks.dir), "--sleep", "0.5", "--env-to", f"{tmp_path}/env{i}")
        for i in ids
    ]
    batch = api.submit(write_commands(tmp_path / "cmds", lines), threads=2, settings=settings)
    final = api.wait(batch.id, settings=settings, timeout=60)
    # Then each ran once, alone on its node, told to use 2 threads
    assert (final.succeeded, final.failed) == (3, 0), final
    marks.assert_exactly_once(ids)
    assert most_at_once(marks, ids) == 1
    for i in ids:
        env = json.loads((tmp_path / f"env{i}").read_text())
        assert {v: env[v] for v in THREAD_VARS} == dict.fromkeys(THREAD_VARS, "2")


def test_a_command_killed_for_memory_is_handed_back_then_fails_as_oom_naming_its_peak(
    tmp_path: Path,
    settings: Settings,
    workers: Callable[..., Worker],
    cgroups: Callable[[int], MemoryCgroup],
    run_tag: str,
) -> None:
    # Given one node of 384 MiB (a cgroup of its own), two OOM kills allowed
    env = {"TBSS_QUEUE_OOM_LIMIT": "2"}
    group1, group2 = cgroups(384 * MiB), cgroups(384 * MiB)
    workers("w1", 1, env=env, wrap=group1.wrap)
    marks, log = Markers(tmp_path / "marks"), tmp_path / "log"

    def big(name: str) -> str:
        line = job(name, log, "--marker", str(marks.dir), "--alloc", "512", "--sleep", "1")
        cmds = write_commands(tmp_path / f"cmds-{name}", [line])
        return api.submit(cmds, mem=100 * MiB, settings=settings).id

    # When a command that asks 100 MiB but grows to 512 MiB runs there
    alone = big("alone")
    final = api.wait(alone, settings=settings, timeout=60)
    # Then the kernel killed it, it was handed back (not failed), and since the only node
    # online had killed it running alone, it failed as `oom`, naming its peak, having started once
    assert (final.failed, final.requeued, group1.oom_kills()) == (1, 1, 1), final
    assert marks.counts(["alone"]) == {"alone": (1, 0)}
    [first] = api.failures(alone, settings=settings)
    assert first.cause == "oom" and first.peak_rss and first.peak_rss >= 128 * MiB
    assert first.message == (
        f"killed by the kernel for want of memory (OOM) at a peak of {human(first.peak_rss)}, "
        "on every node online, the last time running alone"
    )
    # Given a second node of 384 MiB beside it
    workers("w2", 1, env=env, wrap=group2.wrap)
    # When another such command is queued
    batch = big("twice")
    final = api.wait(batch, settings=settings, timeout=60)
    # Then it was killed on each node once, handed back after the first, and failed as `oom`
    # on the second (TBSS_QUEUE_OOM_LIMIT), naming its peak; it started once per node
    assert (final.failed, final.succeeded, final.requeued) == (1, 0, 1), final
    assert (group1.oom_kills(), group2.oom_kills()) == (2, 1)
    assert marks.counts(["twice"]) == {"twice": (2, 0)}
    [failure] = api.failures(batch, settings=settings)
    record = failure.to_dict()
    assert record["cause"] == "oom", record
    assert "killed by the kernel for want of memory (OOM) at a peak of" in record["message"]
    assert record["message"].endswith("; killed so on 2 nodes (limit 2)")
    assert record["peak_rss"] >= 128 * MiB  # the job, when its group ran out
    # and `failures`, status --json and the report say so too
    cli_env = settings_env(settings, run_tag)
    shown = tbss_queue("failures", batch, env=cli_env).stdout
    assert "OOM" in shown and f"peak memory: {human(record['peak_rss'])}" in shown
    as_json = json.loads(tbss_queue("status", batch, "--json", env=cli_env).stdout)
    assert as_json["failed"] == 1 and as_json["peak_rss"] >= record["peak_rss"]
    html = tmp_path / "report.html"
    api.report(batch, path=html, settings=settings)
    assert f"<td>{human(record['peak_rss'])}</td>" in html.read_text()
    # When a command's child grows past the limit (fnirt under fsl_reg) and the command itself
    # exits 1 when it is killed
    line = job("parent", log, "--marker", str(marks.dir), "--child-alloc", "512", "--sleep", "1")
    cmds = write_commands(tmp_path / "cmds-parent", [line])
    batch = api.submit(cmds, mem=100 * MiB, settings=settings).id
    final = api.wait(batch, settings=settings, timeout=60)
    # Then that too is the node's: handed back once, then failed as `oom` on the second node
    assert (final.failed, final.requeued) == (1, 1), final
    assert marks.counts(["parent"]) == {"parent": (2, 0)}
    [failure] = api.failures(batch, settings=settings)
    assert (
        failure.cause == "oom"
        and "(exit code 1): fnirt failed; killed so on 2 nodes" in failure.message
    )


def test_a_request_larger_than_every_node_is_refused_at_submit_and_by_fsl_sub(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], run_tag: str
) -> None:
    # Given a worker node of 2 GiB and 2 slots (no cgroup needed: --mem says it)
    w1 = workers("w1", 2, "--mem", "2G")
    write_commands(tmp_path / "cmds", [f"{sys.executable} -c pass"])
    env = settings_env(settings, run_tag)
    # When a batch asks 4G per command, or 4 threads
    for args, option, why in (
        (("--mem", "4G"), "--mem", "needs 4 GiB, largest 2 GiB"),
        (("--threads", "4"), "--threads", "needs 4 slots, largest 2"),
    ):
        res = tbss_queue("submit", "cmds", *args, env=env, cwd=tmp_path)
        # Then submit refuses it in one line naming the option, and queues nothing
        assert res.returncode == 2, res.stderr
        assert res.stderr.strip().splitlines() == [
            f"tbss-queue: error: {option}: no worker node that ever joined can take it ({why}); "
            "nothing queued"
        ]
    # and fsl_sub -R 4 (GB) is refused in fsl_sub's own style
    fsl_env = {**env, "FSLSUB_CONF": str(_fsl_sub_conf(tmp_path))}
    res = _fsl_sub("-R", "4", sys.executable, "-c", "pass", env=fsl_env, cwd=tmp_path)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert res.stderr.strip() == (
        "Error submitting job - -R: no worker node that ever joined can take it "
        "(needs 4 GiB, largest 2 GiB); nothing queued"
    )
    assert not (tmp_path / ".tbss-queue-jobs").exists()  # no job's file left behind
    assert api.list_batches(settings=settings) == []
    # Given that node gone, and one of 1 GiB online instead
    w1.stop()
    workers("w2", 2, "--mem", "1G")
    wait_until(lambda: len([n for n in api.nodes(settings=settings) if n.online]) == 1)
    # When a batch asks 1.5G: more than any node online has, not than every node that joined
    res = tbss_queue("submit", "cmds", "--mem", "1.5G", env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    # Then it stays queued, and status says why
    res = tbss_queue("status", env=env)
    shown = res.stdout + res.stderr
    assert "1 queued: no node can take it (needs 1.5 GiB, largest 1 GiB)" in shown, shown
    assert api.status(settings=settings).queued == 1
    # and the node online gives it back unclaimed, at once, every time it comes to it
    w2_log = next(tmp_path.glob("worker-w2-*.log"))
    wait_until(
        lambda: "needs 1.5 GiB, more than this node's 1 GiB and 2 slots" in w2_log.read_text(),
        what="w2 giving it back",
    )


def _fsl_sub_conf(tmp_path: Path) -> Path:
    conf = tmp_path / "fsl_sub.yml"
    plugin = Path(__file__).parent.parent / "fsl_sub_plugin_tbss_queue" / "fsl_sub_tbss_queue.yml"
    conf.write_text(plugin.read_text())
    return conf


def _fsl_sub(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:

    return subprocess.run(
        ["fsl_sub", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60
    )


def test_a_size_that_is_not_one_is_refused_in_one_line_naming_the_option(
    tmp_path: Path, settings: Settings, run_tag: str
) -> None:
    # Given a commands file and a broker
    write_commands(tmp_path / "cmds", [f"{sys.executable} -c pass"])
    env = settings_env(settings, run_tag)
    for args in (
        ("submit", "cmds", "--mem", "lots"),
        ("submit", "cmds", "--mem", "0G"),
        ("worker", "--mem", "2X", "--allow-any"),
    ):
        # When a size is not one
        res = tbss_queue(*args, env=env, cwd=tmp_path, timeout=60)
        # Then one line names the option and the value, exit 2, nothing queued or started
        assert res.returncode == 2, (args, res.stderr)
        assert res.stderr.strip().splitlines() == [
            f"tbss-queue: error: --mem {args[args.index('--mem') + 1]!r}: expected a size like "
            "300M, 2G or 1.5GiB"
        ]
    assert api.list_batches(settings=settings) == []
    assert api.nodes(settings=settings) == []
