"""The balance benchmark's arithmetic (benchmarks/balance.py): no timing, no processes."""

from __future__ import annotations

import pytest

from benchmarks.balance import Span, analyse, ideal_spans, list_schedule, workload


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
