"""The benchmarks' arithmetic (benchmarks/balance.py, run.py, profile.py), and the peers that
run in this process or as one command (GNU parallel, HyperQueue) on a few lines."""

from __future__ import annotations

from pathlib import Path

import pytest

import benchmarks.systems as systems
from benchmarks.balance import Span, analyse, ideal_spans, list_schedule, workload
from benchmarks.profile import parse_raw, stage_of, top
from benchmarks.run import queues_only, ratio
from benchmarks.systems import CeleryFloor, CelerySoloFloor, GnuParallel, HyperQueue


def test_list_schedule_takes_commands_in_order_to_the_slot_that_frees_first() -> None:
    # Given three commands on two slots
    # When they are scheduled in submission order
    schedule = list_schedule([3.0, 1.0, 1.0], 2)
    # Then the third goes to the slot the 1-second command freed, not the longest-idle one
    assert schedule == [(0, 0.0, 3.0), (1, 0.0, 1.0), (1, 1.0, 2.0)]


def test_lpt_is_never_worse_than_submission_order_here() -> None:
    # Given the benchmark's own seeded workload
    _, nominal = workload(200)
    # When both ideals are computed on 8 slots
    in_order = max(s.ended for s in ideal_spans(nominal, 8))
    longest_first = max(s.ended for s in ideal_spans(nominal, 8, longest_first=True))
    # Then LPT is the tighter bound, and both are at least the work divided by the slots
    assert sum(nominal) / 8 <= longest_first <= in_order


def test_the_loss_terms_add_up_to_makespan_minus_ideal() -> None:
    # Given a run on 2 slots with a late start, an overhead, a gap and a third slot unused
    spans = [
        Span("a", 0.5, 2.6, 2.0),  # starts 0.5 s late, runs 0.1 s over
        Span("a", 2.7, 3.7, 1.0),  # after a 0.1 s gap
        Span("b", 0.0, 1.0, 1.0),
    ]
    ideal = analyse(ideal_spans([2.0, 1.0, 1.0], 3), 0.0, 3)
    # When the run is analysed against 3 slots
    run = analyse(spans, 0.0, 3)
    # Then start-up, overhead, gaps and the extra idle at the end account for the whole loss
    extra_idle = run["idle_end"] - ideal["idle_end"]
    loss = (run["head"] + run["overhead"] + sum(run["gaps"]) + extra_idle) / 3
    assert loss == pytest.approx(run["makespan"] - ideal["makespan"])
    assert run["rows"] == 2 and run["late"] == 2  # an unused slot ran dry at the start


def test_the_spawners_are_shown_but_never_the_best_peer_of_a_ratio() -> None:
    # Given an overhead row where xargs and GNU parallel are far below every queue
    values = {
        "tbss-queue": "5.00 (4.90-5.10)",
        "plain Celery": "4.00 (3.90-4.10)",
        "xargs -P": "1.00 (0.90-1.10)",
        "GNU parallel": "2.00 (1.90-2.10)",
        "HyperQueue": "3.00 (2.90-3.10)",
        "dask.distributed": "failed: RuntimeError: boom",
    }
    # When tbss-queue is compared with the best peer
    # Then the best is the best queue (HyperQueue), not a spawner; a failed peer is skipped
    assert ratio(queues_only(values)) == "1.67"


def test_a_peer_that_is_not_installed_is_left_out_with_a_note(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a Python peer whose module cannot be imported
    monkeypatch.setattr(
        systems, "PEERS", [("no_such_module_for_tbssq", systems.HyperQueue, "pip install it")]
    )
    # When the installed peers are listed
    peers = systems.installed_peers()
    # Then it is not among them, and stderr says how to install it
    assert systems.HyperQueue not in peers and systems.Xargs in peers
    assert "peer HyperQueue not installed: pip install it" in capsys.readouterr().err


def _lines_that_leave_files(tmp_path: Path, n: int) -> list[str]:
    # each line runs a program (not a shell builtin) that leaves a mark of its own
    return [f"touch {tmp_path / f'ran-{i}'}" for i in range(n)]


@pytest.mark.skipif(not GnuParallel.installed(), reason="apt-get install parallel")
def test_gnu_parallel_runs_every_line_once(tmp_path: Path) -> None:
    # Given GNU parallel on 2 slots
    system = GnuParallel(tmp_path)
    system.start(1, 2)
    # When it runs 20 lines
    took = system.run(_lines_that_leave_files(tmp_path, 20))
    # Then every line ran
    assert sorted(p.name for p in tmp_path.glob("ran-*")) == sorted(f"ran-{i}" for i in range(20))
    assert took > 0


@pytest.mark.parametrize("floor", [CeleryFloor, CelerySoloFloor], ids=["prefork", "solo"])
def test_celerys_floor_runs_every_line_once_on_tbss_queues_celery_settings(
    tmp_path: Path, floor: type[CeleryFloor]
) -> None:
    # Given Celery's floor (tbss-queue's Celery app, a task that only runs the line) on 2 slots
    server = systems.fresh_redis(tmp_path)
    system = floor(tmp_path, server)
    try:
        system.start(1, 2)
        # When it runs 20 lines
        took = system.run(_lines_that_leave_files(tmp_path, 20))
    finally:
        system.stop()
        server.stop()
    # Then every line ran, and the run ended when the last one had
    assert sorted(p.name for p in tmp_path.glob("ran-*")) == sorted(f"ran-{i}" for i in range(20))
    assert took > 0 and system.tally.stat().st_size == 20


def test_hyperqueue_runs_every_line_once_on_several_workers(tmp_path: Path) -> None:
    # Given HyperQueue's in-process cluster of 2 workers x 2 cores (the wheel has no `hq`)
    pytest.importorskip("hyperqueue")
    system = HyperQueue(tmp_path)
    system.start(2, 2)
    try:
        # When it runs 20 lines, and then one that fails
        system.run(_lines_that_leave_files(tmp_path, 20))
        with pytest.raises(RuntimeError, match="1 of 1 tasks failed"):
            system.run(["false"])
    finally:
        system.stop()
    # Then every line ran, and a failure is not taken for a finished run
    assert sorted(p.name for p in tmp_path.glob("ran-*")) == sorted(f"ran-{i}" for i in range(20))


def test_the_profile_reads_py_spys_raw_stacks_per_process_and_stage() -> None:
    # Given py-spy's raw output of a worker (main 10) and a pool process (11) under it
    root = "_run_module_as_main (<frozen runpy>)"
    raw = "\n".join(
        [
            f'process 10:"w";{root};asynloop (celery/worker/loops.py) 4',
            f'process 10:"w";process 11:"w";{root};execute (tbss_queue/tasks.py);'
            "_claim (tbss_queue/tasks.py);BatchStore._run (tbss_queue/batches.py);"
            "read_from_socket (redis/_parsers/hiredis.py) 3",
            f'process 10:"w";process 11:"w";{root};execute (tbss_queue/tasks.py);'
            "_execute (tbss_queue/tasks.py);record_end (tbss_queue/tasks.py) 2",
            'process 10:"w";process 11:"w";Thread._bootstrap (threading.py) 5',
        ]
    )
    # When it is parsed
    samples = parse_raw(raw)
    # Then each stack belongs to the process sampled, the innermost one named, its kind read
    # from the chain of processes; a background thread's stack is not the main thread's
    assert [(s.pid, s.kind, s.count, s.main_thread) for s in samples] == [
        (10, "main", 4, True),
        (11, "pool process", 3, True),
        (11, "pool process", 2, True),
        (11, "pool process", 5, False),
    ]
    # And a stage is the deepest marked frame's; total time counts tbss_queue's frames only
    assert stage_of(samples[1].frames) == "claim (claim.lua)"
    assert stage_of(samples[2].frames) == "record (finish.lua)"
    assert top(samples, "self", 1) == [("threading.py:Thread._bootstrap", 5)]
    assert top(samples, "total", 1) == [("tbss_queue/tasks.py:execute", 5)]
    # And a guard under a pool process is a guard
    guard = 'process 10:"w";process 11:"w";process 12:"python -S -I /x/guard.py";main (g.py) 1'
    assert parse_raw(guard)[0].kind == "guard"
