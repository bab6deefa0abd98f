"""The autoscaling policy (`chaos_planner.autoscale`): rules, messages and properties."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from chaos_planner import AutoscaleInput, Observation, decide
from chaos_planner.autoscale import marginal_goodput, scaling_curve
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

pytestmark = pytest.mark.unit


def measured(curve: dict[int, float], times: int = 2, at: float = 0.0) -> tuple[Observation, ...]:
    """`times` observations of each count of `curve` (samples/s), all taken at `at`."""
    return tuple(
        Observation(workers=n, samples_per_s=t, at=at)
        for n, t in curve.items()
        for _ in range(times)
    )


def given_(**kw: Any) -> AutoscaleInput:
    base: dict[str, Any] = dict(min_replicas=1, max_replicas=5, replicas=2,
                                target_per_worker=10.0, now=100.0)  # fmt: skip
    return AutoscaleInput(**{**base, **kw})


def test_marginal_goodput_of_the_last_worker() -> None:
    assert marginal_goodput({2: 30.0}, 2) == 15.0  # nothing measured below: the average
    assert marginal_goodput({1: 20.0, 2: 30.0}, 2) == 10.0
    assert marginal_goodput({1: 20.0, 4: 50.0}, 4) == 10.0  # per worker over the gap
    assert marginal_goodput({1: 20.0}, 2) is None


def test_the_curve_is_the_median_of_remembered_observations() -> None:
    obs = [Observation(workers=2, samples_per_s=v, at=a) for v, a in ((1, 0), (5, 90), (7, 95))]
    assert scaling_curve(obs, now=100, memory_s=50) == {2: [5, 7]}
    # an outlier does not move the median
    noisy = (*measured({2: 40.0}, 3), Observation(workers=2, samples_per_s=4000.0, at=0.0))
    assert decide(given_(observations=noisy)).goodput == 40.0


def test_scales_up_while_the_last_worker_pays() -> None:
    d = decide(given_(observations=measured({1: 25.0, 2: 40.0})))
    assert (d.replicas, d.reason) == (3, "GoodputAboveTarget")
    assert d.marginal == 15.0 and d.goodput == 40.0
    assert "40.0 samples/s with 2 workers" in d.message and "15.0" in d.message


def test_scales_down_when_the_last_worker_no_longer_pays() -> None:
    # network-bound: the third worker made the job slower
    d = decide(given_(replicas=3, observations=measured({2: 40.0, 3: 38.0})))
    assert (d.replicas, d.reason) == (2, "MarginalGoodputBelowTarget")
    assert "-2.0" in d.message


def test_stays_where_the_next_worker_was_measured_not_to_pay() -> None:
    d = decide(given_(observations=measured({1: 25.0, 2: 40.0, 3: 42.0})))
    assert (d.replicas, d.reason) == (2, "OnTarget")
    assert "3 workers were measured to add 2.0" in d.message


def test_tolerance_band_keeps_a_slightly_low_worker() -> None:
    d = decide(given_(observations=measured({1: 25.0, 2: 34.5})))  # adds 9.5, within 10%
    assert (d.replicas, d.reason) == (2, "OnTarget")
    d = decide(given_(observations=measured({1: 25.0, 2: 33.5})))  # adds 8.5
    assert (d.replicas, d.reason) == (1, "MarginalGoodputBelowTarget")


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        (dict(unschedulable=True, pods_pending=True), "CapacityExhausted"),
        (dict(pods_pending=True), "PodsPending"),
        (dict(last_decision_at=70.0, cooldown_s=60.0), "Cooldown"),
        (dict(quota_headroom=0), "CapacityExhausted"),
        (dict(max_replicas=2), "AtMaximum"),
    ],
)
def test_reasons_not_to_scale_up(kw: dict[str, Any], reason: str) -> None:
    d = decide(given_(observations=measured({1: 25.0, 2: 40.0}), **kw))
    assert (d.replicas, d.reason) == (2, reason), d.message


def test_quota_with_headroom_allows_one_more() -> None:
    assert decide(given_(observations=measured({2: 40.0}), quota_headroom=1)).replicas == 3


def test_measures_before_deciding_and_forgets_old_measurements() -> None:
    d = decide(given_(observations=measured({2: 40.0}, times=1)))
    assert (d.replicas, d.reason) == (2, "Measuring")
    assert "1 of 2" in d.message
    d = decide(given_(observations=measured({2: 40.0}, at=-4000.0)))
    assert d.reason == "Measuring"


def test_at_minimum_and_bounds() -> None:
    d = decide(given_(replicas=1, observations=measured({1: 5.0})))
    assert (d.replicas, d.reason) == (1, "AtMinimum")
    assert decide(given_(replicas=0)).reason == "BelowMinimum"
    assert decide(given_(replicas=0, min_replicas=0)).reason == "AtMinimum"
    assert decide(given_(replicas=9)).replicas == 5
    d = decide(given_(replicas=9, last_decision_at=100.0, cooldown_s=60.0))
    assert d.reason == "AboveMaximum"  # bounds are not subject to the cooldown


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValidationError, match="min_replicas must not exceed"):
        given_(min_replicas=3, max_replicas=2)
    with pytest.raises(ValidationError):
        given_(target_per_worker=0.0)
    with pytest.raises(ValidationError):
        Observation(workers=0, samples_per_s=1.0, at=0.0)
    with pytest.raises(ValidationError):
        Observation(workers=1, samples_per_s=float("nan"), at=0.0)


# ----------------------------------------------------------------------------- properties

observations = st.lists(
    st.builds(
        Observation,
        workers=st.integers(1, 8),
        samples_per_s=st.floats(0, 1e4),
        at=st.floats(-1e4, 1e3),
    ),
    max_size=20,
)


@st.composite
def inputs(draw: st.DrawFn) -> AutoscaleInput:
    low = draw(st.integers(0, 6))
    high = draw(st.integers(max(low, 1), 8))
    return AutoscaleInput(
        min_replicas=low,
        max_replicas=high,
        replicas=draw(st.integers(0, 10)),
        target_per_worker=draw(st.floats(0.01, 1e4)),
        now=draw(st.floats(0, 1e3)),
        cooldown_s=draw(st.floats(0, 600)),
        last_decision_at=draw(st.none() | st.floats(-1e3, 1e3)),
        observations=tuple(draw(observations)),
        pods_pending=draw(st.booleans()),
        unschedulable=draw(st.booleans()),
        quota_headroom=draw(st.none() | st.integers(0, 3)),
        tolerance=draw(st.floats(0, 0.5)),
        min_observations=draw(st.integers(1, 3)),
    )


@given(inputs())
def test_always_within_bounds_one_step_at_a_time(given: AutoscaleInput) -> None:
    d = decide(given)
    assert given.min_replicas <= d.replicas <= given.max_replicas
    if given.min_replicas <= given.replicas <= given.max_replicas:
        assert abs(d.replicas - given.replicas) <= 1
    assert d.message


@given(inputs())
def test_cooldown_pending_and_quota_respected(given: AutoscaleInput) -> None:
    d = decide(given)
    if not given.min_replicas <= given.replicas <= given.max_replicas:
        return
    in_cooldown = (
        given.last_decision_at is not None and given.now - given.last_decision_at < given.cooldown_s
    )
    if in_cooldown or given.pods_pending or given.unschedulable:
        assert d.replicas == given.replicas
    if given.quota_headroom == 0:
        assert d.replicas <= given.replicas


def simulate(curve: Callable[[int], float], low: int, high: int, start: int, target: float,
             ticks: int = 400) -> list[int]:  # fmt: skip
    """The replica counts over `ticks` resyncs of a job whose goodput follows `curve`."""
    cooldown, tick = 10.0, 5.0
    n, last, obs, path = start, None, [], [start]
    for i in range(ticks):
        now = i * tick
        if n > 0:
            obs.append(Observation(workers=n, samples_per_s=curve(n), at=now))
        d = decide(AutoscaleInput(min_replicas=low, max_replicas=high, replicas=n,
                                  target_per_worker=target, now=now, cooldown_s=cooldown,
                                  last_decision_at=last, observations=tuple(obs)))  # fmt: skip
        if d.replicas != n:
            n, last = d.replicas, now
        path.append(n)
    return path


def reversals(path: Sequence[int]) -> int:
    moves = [b - a for a, b in itertools.pairwise(path) if b != a]
    return sum(1 for a, b in itertools.pairwise(moves) if (a > 0) != (b > 0))


@st.composite
def bounds(draw: st.DrawFn) -> tuple[int, int, int]:
    low = draw(st.integers(1, 6))
    high = draw(st.integers(low, 8))
    return low, high, draw(st.integers(low, high))


@settings(max_examples=60, deadline=None)
@given(
    bounds(),
    st.floats(160, 300),
    st.lists(st.floats(-20, 100), min_size=7, max_size=7),
    st.floats(0.5, 400),
)
def test_no_flapping_on_a_concave_curve(b: tuple[int, int, int], first: float,
                                        steps: list[float], target: float) -> None:  # fmt: skip
    """Diminishing returns (also past the peak, network-bound): at most one change of
    direction, then it stays for good."""
    low, high, start = b
    marginals = [first, *sorted(steps, reverse=True)]  # goodput stays >= 0
    path = simulate(lambda n: sum(marginals[:n]), low, high, start, target)
    assert reversals(path) <= 1, path
    assert len(set(path[-100:])) == 1, path
    assert all(low <= n <= high for n in path)


@settings(max_examples=60, deadline=None)
@given(bounds(), st.lists(st.floats(0, 500), min_size=8, max_size=8), st.floats(0.5, 60))
def test_settles_on_any_constant_curve(b: tuple[int, int, int], goodput: list[float],
                                       target: float) -> None:  # fmt: skip
    """Whatever the curve, decisions stop: a count measured not to pay is not tried again."""
    low, high, start = b
    path = simulate(lambda n: goodput[n - 1], low, high, start, target)
    assert len(set(path[-100:])) == 1, path
    assert reversals(path) <= high - low + 1, path
