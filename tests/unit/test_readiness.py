"""When a pulling newcomer asks to switch in, and which step the root gives it (pure)."""

from __future__ import annotations

import pytest
from chaos_worker.readiness import (
    LEAD,
    MAX_EXTRA_STEPS,
    ask_now,
    ready_in,
    step_period,
    switch_steps,
)


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
