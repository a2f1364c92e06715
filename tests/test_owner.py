"""The owner policy of a lent machine (issue 24, point 3): a node pauses its commands while
other processes load the machine (--yield-load) and takes commands only in its --hours.

Real redis-server, real `tbss-queue worker` processes, a real CPU-burning process as the
load (tests/bin/burner.py, started and killed here), and a clock file the test sets (the
worker's hidden --clock-file). Each command writes per-command marker lines (start, tick
every 0.1 s, done: pid and time), from which every test ends with exact counts.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import redis
from click.testing import CliRunner

from tbss_queue import api
from tbss_queue.cli import cli, main
from tbss_queue.config import Settings
from tbss_queue.execution import pausing, runner
from tbss_queue.execution.owner import CALM_WINDOWS, Decision, Hours, Owner, OwnerPolicy, watch
from tbss_queue.models import NodeInfo
from tbss_queue.queue.keys import RUNNING, lease_key
from tbss_queue.views.progress import notes

from .conftest import Worker, settings_env, write_commands
from .faults import Markers, gone, job, wait_until
from .test_flower import fetch, flower

pytestmark = pytest.mark.slow

BURNER = str(Path(__file__).parent / "bin" / "burner.py")

# the policy's windows, short for the tests (the defaults are 10 s and 6 windows of calm)
FAST = ("--load-window", "0.3")


class Burner:
    """The synthetic load: a host process whose children burn a CPU each, on demand."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, BURNER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def _say(self, what: str) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "ok"

    def start(self) -> None:
        self._say("start")

    def stop(self) -> None:
        self._say("stop")

    def close(self) -> None:
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            p.kill()
        self.proc.kill()
        self.proc.wait(10)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def burner() -> Iterator[Burner]:
    b = Burner()
    try:
        yield b
    finally:
        b.close()


def node(settings: Settings, name: str) -> NodeInfo:
    return next(n for n in api.nodes(settings=settings) if n.node.startswith(name + "@"))


def ticks(marks: Markers, cid: str, pid: int | None = None) -> list[float]:
    return [m.time for m in marks.of(cid) if m.kind == "tick" and pid in (None, m.pid)]


def stopped(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_STOPPED
    except psutil.NoSuchProcess:
        return False


def renewed_twice(settings: Settings, batch_id: str, task_id: str) -> None:
    """Wait until the command's lease has been renewed twice (its TTL rose twice)."""
    r = redis.Redis.from_url(settings.broker)
    key, rises, last = lease_key(batch_id, task_id), 0, r.pttl(lease_key(batch_id, task_id))

    def rose() -> bool:
        nonlocal rises, last
        now = r.pttl(key)
        rises += now > last
        last = now
        return rises >= 2

    wait_until(rose, timeout=15, what="two lease renewals")


def running_task(settings: Settings, batch_id: str) -> str:
    r = redis.Redis.from_url(settings.broker, decode_responses=True)
    return next(m.split("|", 1)[1] for m in r.hkeys(RUNNING) if m.startswith(batch_id + "|"))


def submit_one(tmp_path: Path, settings: Settings, marks: Markers, cid: str, *extra: str) -> str:
    line = job(cid, tmp_path / "log", "--marker", str(marks.dir), *extra)
    return api.submit(write_commands(tmp_path / f"{cid}.commands", [line]), settings=settings).id


def test_a_load_of_other_processes_pauses_the_command_and_its_lease_holds_until_it_falls(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], burner: Burner
) -> None:
    # Given a lent node that yields to a load of 0.4 CPUs, running a command that ticks
    marks = Markers(tmp_path / "marks")
    scope = ("--load-scope", str(burner.proc.pid))
    workers("w1", 1, "--yield-load", "0.4", "--max-pause", "60", *FAST, *scope)
    gate = tmp_path / "gate"
    batch_id = submit_one(tmp_path, settings, marks, "p", "--gate", str(gate))
    wait_until(lambda: len(ticks(marks, "p")) >= 3, timeout=30, what="ticks")
    pid = marks.starts("p")[0].pid
    workers("w2", 1)  # a second node, idle, that could take the command over
    assert node(settings, "w1").state == "online"
    # When another process burns a CPU
    burner.start()
    # Then the node is paused, saying why, and its command's tree is stopped
    wait_until(lambda: node(settings, "w1").state == "paused", timeout=15, what="paused")
    assert "load of other processes" in (node(settings, "w1").paused or "")
    wait_until(lambda: stopped(pid), timeout=5, what="SIGSTOP")
    before = len(ticks(marks, "p"))
    task_id = running_task(settings, batch_id)
    renewed_twice(settings, batch_id, task_id)
    # ...no tick meanwhile, the lease kept by the paused node, not taken over by the other
    assert len(ticks(marks, "p")) == before and stopped(pid)
    assert api.status(batch_id, settings=settings).running == 1
    assert len(marks.starts("p")) == 1
    shown = CliRunner().invoke(cli, ["nodes", "--broker", settings.broker])
    assert "paused" in shown.output and "load of other processes" in shown.output
    # When the load ends, it goes on where it stopped, once
    burner.stop()
    wait_until(lambda: len(ticks(marks, "p")) > before, timeout=15, what="ticks again")
    assert node(settings, "w1").state == "online"
    gate.touch()
    final = api.wait(batch_id, settings=settings, timeout=60)
    assert (final.succeeded, final.failed, final.requeued) == (1, 0, 0)
    assert marks.counts(["p"]) == {"p": (1, 1)}
    assert ticks(marks, "p", pid) == ticks(marks, "p")  # all of one copy
    assert [n.node.split("@")[0] for n in final.nodes if n.succeeded] == ["w1"]


def test_a_command_paused_past_max_pause_is_handed_back_and_done_once_elsewhere(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], burner: Burner
) -> None:
    # Given a lent node that pauses for at most 2 s, running a command that ticks
    marks = Markers(tmp_path / "marks")
    scope = ("--load-scope", str(burner.proc.pid))
    workers("w1", 1, "--yield-load", "0.4", "--max-pause", "2s", *FAST, *scope)
    gate = tmp_path / "gate"
    batch_id = submit_one(tmp_path, settings, marks, "h", "--gate", str(gate))
    wait_until(lambda: len(ticks(marks, "h")) >= 2, timeout=30, what="ticks")
    first = marks.starts("h")[0].pid
    # When other processes load the machine for longer than that
    burner.start()
    wait_until(lambda: stopped(first), timeout=15, what="SIGSTOP")
    # Then the command is handed back (not failed), its stopped tree dead
    wait_until(lambda: api.status(batch_id, settings=settings).queued == 1, what="hand back")
    assert gone([first], timeout=5)
    st = api.status(batch_id, settings=settings)
    assert (st.failed, st.succeeded, st.running) == (0, 0, 0)
    # ...and another node does it, once
    gate.touch()
    workers("w2", 1)
    final = api.wait(batch_id, settings=settings, timeout=60)
    assert (final.succeeded, final.failed) == (1, 0)
    assert [n.node.split("@")[0] for n in final.nodes if n.succeeded] == ["w2"]
    marks.assert_exactly_once(["h"], restarts=True)
    assert len(marks.starts("h")) == 2
    second = marks.starts("h")[1]
    assert max(ticks(marks, "h", first)) < second.time  # never two copies at once


def test_a_worker_stopped_while_its_command_is_paused_leaves_no_stopped_orphan(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], burner: Burner
) -> None:
    # Given a paused command (SIGSTOPped) on a node
    marks = Markers(tmp_path / "marks")
    scope = ("--load-scope", str(burner.proc.pid))
    w1 = workers("w1", 1, "--yield-load", "0.4", "--grace", "1", *FAST, *scope)
    batch_id = submit_one(tmp_path, settings, marks, "s", "--ticks", "100", "--on-term")
    wait_until(lambda: len(ticks(marks, "s")) >= 2, timeout=30, what="ticks")
    pid = marks.starts("s")[0].pid
    burner.start()
    wait_until(lambda: stopped(pid), timeout=15, what="SIGSTOP")
    # When the worker is told to stop (SIGTERM, grace 1 s)
    w1.proc.send_signal(15)
    assert w1.proc.wait(30) == 0
    # Then the command got its SIGTERM (continued to hear it) and is gone, handed back
    assert gone([pid], timeout=5)
    assert [m.kind for m in marks.of("s")].count("term") == 1
    st = api.status(batch_id, settings=settings)
    assert (st.queued, st.failed, st.succeeded) == (1, 0, 0)


def test_a_worker_killed_while_its_command_is_paused_leaves_no_stopped_orphan(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], burner: Burner
) -> None:
    # Given a paused command (SIGSTOPped, with a child) on a node
    marks = Markers(tmp_path / "marks")
    scope = ("--load-scope", str(burner.proc.pid))
    w1 = workers("w1", 1, "--yield-load", "0.4", *FAST, *scope)
    pidfile = tmp_path / "pids"
    submit_one(tmp_path, settings, marks, "k", "--gate", str(tmp_path / "never"),
               "--child", "--pidfile", str(pidfile))  # fmt: skip
    wait_until(lambda: len(ticks(marks, "k")) >= 2, timeout=30, what="ticks")
    pids = [int(p) for p in pidfile.read_text().split()]
    burner.start()
    wait_until(lambda: all(stopped(p) for p in pids), timeout=15, what="SIGSTOP")
    # When the whole worker is SIGKILLed (nothing of it can act but its guards)
    w1.signal(9)
    w1.proc.wait(10)
    # Then the stopped command and its child are dead, not left stopped
    assert gone(pids, timeout=5), [p for p in pids if stopped(p)]


def test_owner_options_are_checked_in_one_line_naming_the_option(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Given settings of the owner policy that can't be kept, and a broker nobody listens on
    cases = {
        ("--hours", "19-07"): "--hours '19-07': expected HH:MM-HH:MM, e.g. 19:00-07:00",
        ("--hours", "25:00-07:00"): "--hours '25:00-07:00': expected HH:MM-HH:MM",
        ("--hours", "07:00-07:00"): "--hours '07:00-07:00': starts and ends at the same time",
        ("--max-pause", "10m"): "--max-pause 600 s: must be more than 0 and at most 300 s",
        ("--max-pause", "soon"): "--max-pause 'soon': expected a duration",
        ("--yield-load", "-1"): "--yield-load -1: must be more than 0 CPUs",
    }
    for args, named in cases.items():
        # When a worker is started with one
        with pytest.raises(SystemExit) as exited:
            main(["worker", "--broker", "redis://127.0.0.1:1/0", *args])
        # Then it exits 2 before touching the broker, in one line naming the option
        said = capsys.readouterr().err.splitlines()
        assert exited.value.code == 2 and len(said) == 1, said
        assert said[0].startswith("tbss-queue: error: " + named), said


def test_a_node_takes_commands_only_in_its_hours_and_hands_back_what_outlasts_grace(
    tmp_path: Path, settings: Settings, workers: Callable[..., Worker], run_tag: str
) -> None:
    # Given a node lent 19:00-07:00 by a clock the test sets, at 06:59, with grace 3 s
    clock = tmp_path / "clock"
    clock.write_text("2026-01-05T06:59:00")
    marks = Markers(tmp_path / "marks")
    hours = ("--hours", "19:00-07:00", "--clock-file", str(clock))
    workers("w1", 2, *hours, "--grace", "3", *FAST)
    # ...running A and B (each until its gate file appears), C waiting behind them
    gate = {c: tmp_path / f"gate-{c}" for c in "AB"}
    lines = [job(c, tmp_path / "log", "--marker", str(marks.dir)) for c in "ABC"]
    lines[0] += f" --gate {gate['A']}"
    lines[1] += f" --gate {gate['B']}"
    batch_id = api.submit(write_commands(tmp_path / "c", lines), settings=settings).id
    wait_until(lambda: marks.starts("A") and marks.starts("B"), timeout=30, what="A and B")
    first_b = marks.starts("B")[0].pid
    # When its hours end
    clock.write_text("2026-01-05T07:00:30")
    # Then it is paused, saying why, and takes no new command: C waits though A ends
    wait_until(lambda: node(settings, "w1").state == "paused", timeout=15, what="paused")
    assert node(settings, "w1").paused == "outside hours 19:00-07:00"
    gate["A"].touch()
    wait_until(lambda: marks.dones("A"), timeout=15, what="A done")
    # ...and B, still running when --grace is over, is handed back (not failed)
    wait_until(lambda: api.status(batch_id, settings=settings).queued == 2, what="B back")
    assert gone([first_b], timeout=5)
    st = api.status(batch_id, settings=settings)
    assert (st.succeeded, st.failed, st.running) == (1, 0, 0)
    assert marks.starts("C") == []
    assert st.requeued == 1  # B alone: C was never delivered, claimed and handed back
    # ...as `status`, `tbss-queue nodes` and Flower's Batches page show it
    w1 = next(n for n in st.nodes if n.node.startswith("w1@"))
    assert (w1.state, w1.paused) == ("paused", "outside hours 19:00-07:00")
    assert f"{w1.node} paused: outside hours 19:00-07:00" in notes(st)
    listed = CliRunner().invoke(cli, ["nodes", "--broker", settings.broker]).output
    assert "paused" in listed and "outside hours 19:00-07:00" in listed
    with flower(settings_env(settings, run_tag), tmp_path) as base:
        shown = json.loads(fetch(base + "/batches?json=1"))["nodes"]
        page = fetch(base + "/batches")
    row = next(n for n in shown if n["node"].startswith("w1@"))
    assert (row["state"], row["paused"]) == ("paused", "outside hours 19:00-07:00")
    assert '<td class="state">paused</td>' in page
    assert '<td class="why">outside hours 19:00-07:00</td>' in page
    # When another node comes, it does B and C, once each
    gate["B"].touch()
    w2 = workers("w2", 2)
    final = api.wait(batch_id, settings=settings, timeout=60)
    assert (final.succeeded, final.failed) == (3, 0)
    by_node = {n.node.split("@")[0]: n.succeeded for n in final.nodes if n.succeeded}
    assert by_node == {"w1": 1, "w2": 2}
    marks.assert_exactly_once(["A", "B", "C"], restarts=True)
    assert [len(marks.starts(c)) for c in "ABC"] == [1, 2, 1]
    assert max(ticks(marks, "B", first_b)) < marks.starts("B")[1].time  # never two at once
    # When its hours begin again (the other node gone), it takes commands again
    w2.stop()
    clock.write_text("2026-01-05T19:00:30")
    wait_until(lambda: node(settings, "w1").state == "online", timeout=15, what="online")
    later = submit_one(tmp_path, settings, marks, "D")
    final = api.wait(later, settings=settings, timeout=60)
    assert (final.succeeded, final.failed) == (1, 0)
    assert [n.node.split("@")[0] for n in final.nodes if n.succeeded] == ["w1"]
    assert marks.counts(["D"]) == {"D": (1, 1)}


def test_paused_time_does_not_count_against_the_commands_own_time_limit(tmp_path: Path) -> None:
    # Given a command that needs about 1 s of running, under a time limit of 2 s
    marks = Markers(tmp_path / "marks")
    argv = job("t", tmp_path / "log", "--marker", str(marks.dir), "--ticks", "10").split()
    shared = pausing.Shared(max_pause=60.0)
    spec = runner.RunSpec(argv, str(tmp_path), timeout=2.0)
    watch = runner.Watch(tick=0.5, pause=pausing.Pausing(shared, budget=60.0))
    results: list[runner.RunResult] = []
    thread = threading.Thread(target=lambda: results.append(runner.run_command(spec, watch)))
    thread.start()
    try:
        # When the policy pauses it after its first tick, for 2.5 s (past its time limit)
        wait_until(lambda: ticks(marks, "t") != [], timeout=10, what="a tick")
        shared.set(pausing.PAUSE, taking=False)
        pid = marks.starts("t")[0].pid
        wait_until(lambda: stopped(pid), timeout=5, what="SIGSTOP")
        held_since = time.monotonic()
        while time.monotonic() - held_since < 2.5:  # the pause under test, not a hope
            assert stopped(pid)
            time.sleep(0.1)
        shared.set(pausing.RUN, taking=True)
    finally:
        thread.join(30)
    # Then it completes: its paused time was not counted
    assert results[0].ok, results[0].message
    assert marks.counts(["t"]) == {"t": (1, 1)} and len(ticks(marks, "t")) == 10
    gaps = [b - a for a, b in itertools.pairwise(ticks(marks, "t"))]
    assert max(gaps) >= 2.5


def test_the_readme_says_how_to_set_the_owner_policy_for_each_kind_of_node() -> None:
    # Given the README's deployment section on lent machines
    text = (Path(__file__).parent.parent / "README.md").read_text()
    assert "### Lent machines: `--hours` and `--yield-load`" in text
    section = text.split("### Lent machines", 1)[1].split("\n### ", 1)[0]
    # Then it covers a head node, a workstation lent at night and a Slurm pilot
    for who in ("**Head node**", "**Workstation lent at night**", "**Slurm pilot**"):
        assert who in section
    # ...with the options `worker --help` offers, and says what --yield-load measures
    shown = CliRunner().invoke(cli, ["worker", "--help"], terminal_width=200).output
    for option in ("--hours", "--yield-load", "--max-pause", "--load-window"):
        assert option in section and option in shown
    assert "not the load average" in section and "not the load average" in shown


def test_the_policy_decides_with_hysteresis_across_midnight_and_evicts_after_grace() -> None:
    # Given a node lent 19:00-07:00 that yields to 1 CPU, with a grace of 60 s
    policy = OwnerPolicy(hours=Hours.parse("19:00-07:00"), yield_load=1.0)
    owner = Owner(policy, grace=60.0)
    night, morning = dt.datetime(2026, 1, 5, 2, 0), dt.datetime(2026, 1, 5, 7, 0)
    # Then at 02:00 with no load it runs and takes commands
    assert owner.decide(night, 0.1, 0.0) == Decision(pausing.RUN, True, None)
    # ...a load over 1 CPU pauses it; one calm window, or a load over half, does not end that
    assert owner.decide(night, 1.5, 1.0).mode == pausing.PAUSE
    assert owner.decide(night, 0.4, 2.0).mode == pausing.PAUSE
    assert owner.decide(night, 0.7, 3.0).mode == pausing.PAUSE  # calm count starts again
    for i in range(CALM_WINDOWS - 1):
        assert owner.decide(night, 0.4, 4.0 + i).mode == pausing.PAUSE
    assert owner.decide(night, 0.4, 20.0) == Decision(pausing.RUN, True, None)
    # When its hours end, running commands go on for the grace, then are handed back
    out = owner.decide(morning, 0.0, 100.0)
    assert out == Decision(pausing.RUN, False, "outside hours 19:00-07:00")
    assert owner.decide(morning, 0.0, 159.0).mode == pausing.RUN
    assert owner.decide(morning, 0.0, 160.0).mode == pausing.EVICT
    # ...and at 19:00 it takes commands again
    assert owner.decide(dt.datetime(2026, 1, 5, 19, 0), 0.0, 200.0).taking


def test_the_policys_thread_survives_a_consumer_that_fails_once(tmp_path: Path) -> None:
    # Given a node outside its hours whose consumer raises at its first cancel (a reconnect)
    clock = tmp_path / "clock"
    clock.write_text("2026-01-05T12:00:00")
    policy = OwnerPolicy(hours=Hours.parse("19:00-07:00"), load_window=0.05, clock_file=str(clock))
    shared, stop, said, calls = pausing.Shared(60.0), threading.Event(), [], []

    def consume(taking: bool) -> None:
        calls.append(taking)
        if len(calls) == 1:
            raise ConnectionError("the broker connection is being re-established")

    thread = threading.Thread(target=watch, args=(policy, 1.0, shared, consume, said.append, stop))
    thread.start()
    try:
        # Then the next look cancels the queue again and records why the node is paused
        wait_until(lambda: "outside hours 19:00-07:00" in said, timeout=5, what="recorded")
        assert calls[:2] == [False, False] and thread.is_alive()
        assert not shared.taking
    finally:
        stop.set()
        thread.join(5)
