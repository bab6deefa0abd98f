"""The switch step: the prototype's rule and its test vectors (PAPERS.md A.3)."""

from __future__ import annotations

import math

import pytest
from chaos_planner import switch_step
from hypothesis import given
from hypothesis import strategies as st

pytestmark = pytest.mark.unit


def test_paper_vectors() -> None:
    assert switch_step(100, 0.200, 0.002) == 103  # ceil(12.4 ms / 200 ms) + 2
    assert switch_step(100, 0.005, 0.002) == 105  # ceil(12.4 ms / 5 ms) + 2


def test_without_a_step_time_switch_fifteen_steps_ahead() -> None:
    assert switch_step(7, 0.0, 0.002) == 22
    assert switch_step(7, -1.0, 0.5) == 22


def test_margin_and_exact_multiples() -> None:
    assert switch_step(0, 0.001, 0.0) == 12  # e = 10 ms covers 10 steps of 1 ms
    assert switch_step(0, 0.012, 0.005) == 4  # r' = 6 ms, e = 10 ms: 16 ms is 2 steps
    assert switch_step(0, 0.010, 0.1) == 26  # r' = e = 120 ms: 24 steps
    # r' = 9 ms and e = 10 ms are 38 steps of 0.5 ms; one ulp more RTT must not add a step
    # (the float quotient is 38.00000000000001).
    assert switch_step(0, 0.0005, math.nextafter(0.0075, 1)) == 40


@given(st.integers(0, 10**9), st.floats(1e-4, 10.0), st.floats(0.0, 1.0))
def test_always_at_least_three_steps_ahead_and_monotone(step: int, mean: float, rtt: float) -> None:
    target = switch_step(step, mean, rtt)
    assert target >= step + 3
    assert switch_step(step, mean, rtt * 2) >= target  # a slower network never switches sooner
    assert switch_step(step, mean * 2, rtt) <= target  # slower steps never need more of them
    # Enough steps pass before the switch to cover the announcement's trip plus the margin.
    padded = 1.2 * rtt
    assert (target - step - 2) * mean >= padded + max(padded, 0.010) - 1e-9


@pytest.mark.parametrize(
    ("step", "mean", "rtt"), [(-1, 0.1, 0.0), (0, 0.1, -0.001), (0, float("nan"), 0.0)]
)
def test_invalid_arguments(step: int, mean: float, rtt: float) -> None:
    with pytest.raises(ValueError):
        switch_step(step, mean, rtt)
