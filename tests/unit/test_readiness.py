"""When a pulling newcomer asks to switch in, and which step the root gives it (pure)."""

from __future__ import annotations

import pytest
from chaos_worker.membership.readiness import (
    LEAD,
    MAX_EXTRA_STEPS,
    ask_now,
    ready_in,
    step_period,
    switch_decision,
    switch_steps,
)
from chaos_worker.membership.view import View
from chaos_worker.net.wire import Decision


def test_the_step_period_is_the_median_gap_once_there_are_three_arrivals() -> None:
    assert step_period([]) is None
    assert step_period([1.0, 1.05]) is None
    assert step_period([1.0, 1.05, 1.10, 1.30]) == pytest.approx(0.05)


def test_a_newcomer_asks_once_what_is_left_fits_in_the_lead() -> None:
    period = 0.05
    assert not ask_now(0.001, 64_000_000, None)  # no period measured yet
    assert not ask_now(0.2, 64_000_000, period)
    assert ask_now(0.01, 64_000_000, period)
    # exactly at the boundary of the rule
    assert ready_in(0.01, 64_000_000) <= LEAD * period


def test_ready_in_covers_the_pull_left_and_loading() -> None:
    assert ready_in(0.0, 0) > 0
    assert ready_in(0.02, 64_000_000) > 0.02 + 64_000_000 / 5e9


def test_the_switch_is_the_first_boundary_after_the_newcomer_is_ready() -> None:
    # step began at t=10.0 and lasts 0.05 s: boundaries at 10.05, 10.10, 10.15, ...
    assert switch_steps(10.01, 10.0, 0.05, 0.0, 1) == 1
    assert switch_steps(10.01, 10.0, 0.05, 0.03, 1) == 1  # ready at 10.04 < 10.05
    assert switch_steps(10.01, 10.0, 0.05, 0.05, 1) == 2  # ready at 10.06
    assert switch_steps(10.01, 10.0, 0.05, 0.13, 1) == 3  # ready at 10.14


def test_the_switch_is_never_sooner_than_the_minimum_nor_put_off_forever() -> None:
    assert switch_steps(10.01, 10.0, 0.05, 0.0, 2) == 2
    assert switch_steps(10.01, 10.0, None, 1.0, 2) == 2  # no step clock yet
    assert switch_steps(10.01, 10.0, 0.05, 600.0, 1) == 1 + MAX_EXTRA_STEPS


def _decision(epoch: int, members: list[str], *, immediate: bool = False) -> Decision:
    view = View(
        epoch=epoch,
        members={m: f"h:{m}" for m in members},
        speeds=dict.fromkeys(members, 1.0),
        overlay={},
        root=members[0],
        parent={},
    )
    return Decision(
        id=f"{epoch}-{immediate}",
        origin=members[0],
        view=view.model_dump(),
        effective_step=10 + epoch,
        immediate=immediate,
    )


def test_a_newcomer_switches_in_at_the_first_decision_that_admits_it() -> None:
    planned = _decision(3, ["w0", "w1", "w3"])
    assert switch_decision(None, planned, "w3") is planned
    # a decision without it (another member left, say) leaves its switch as it was
    assert switch_decision(planned, _decision(4, ["w0", "w1"]), "w3") is planned
    assert switch_decision(None, _decision(4, ["w0", "w1"]), "w3") is None
    # a crash recovery of the same epoch voids the planned join ...
    recovery = _decision(3, ["w0", "w1"], immediate=True)
    assert switch_decision(planned, recovery, "w3") is None
    # ... and an older one does not
    assert switch_decision(planned, _decision(2, ["w0"], immediate=True), "w3") is planned
    # a later planned view that keeps it (another join decided right after) follows the
    # first: the members expect it from the first one's step
    later = _decision(4, ["w0", "w1", "w3", "w4"])
    assert switch_decision(planned, later, "w3") is planned
    # after a recovery voided it, the root decides the join again: that one counts
    again = _decision(4, ["w0", "w3"])
    assert switch_decision(None, again, "w3") is again
    # a recovery that admits it replaces the planned view
    rescue = _decision(4, ["w0", "w3"], immediate=True)
    assert switch_decision(planned, rescue, "w3") is rescue
    # a stale decision arriving late does not replace a newer one
    assert switch_decision(again, planned, "w3") is again
