"""Baselines: what each rule assigns, and that none beats the exact greedy."""

from __future__ import annotations

from fractions import Fraction

import pytest
from chaos_planner import PlanningError, PlanRequest, Source, solve
from chaos_planner.baselines import apportion, bandwidth_weight, equal_weight
from chaos_planner.greedy import solve_greedy
from hypothesis import given, settings

from tests.unit.test_planner_strategies import requests

pytestmark = pytest.mark.unit

BASELINES = ["single", "equal", "proportional"]


def src(source_id: str, bandwidth: float, **extra) -> Source:
    return Source(id=source_id, bandwidth_bytes_per_s=bandwidth, **extra)


@settings(max_examples=150, deadline=None)
@given(requests(max_sources=6, max_shards=64))
def test_baselines_are_never_better_than_greedy(request: PlanRequest) -> None:
    try:
        best = solve_greedy(request).makespan_s
    except PlanningError:
        return
    for name in BASELINES:
        try:
            plan = solve(request, name)
        except PlanningError:
            assert name == "single"  # only one source holding everything can be impossible
            continue
        assert plan.solver == name
        assert plan.makespan_s >= best
        assert sum(plan.assignment.values()) == plan.shards
        for source in request.sources:
            assert 0 <= plan.assignment[source.id] <= source.shard_limit(plan.shards)


def test_single_picks_the_source_that_finishes_first() -> None:
    request = PlanRequest(
        state_bytes=10**8,
        shard_counts=[1, 2],
        sources=[
            src("near", 1e7, latency_s=0.01),
            src("far", 5e7, latency_s=0.2, ready_s=1.0),
            src("capped", 1e9, max_shards=0),
        ],
    )
    plan = solve(request, "single")
    assert (plan.shards, plan.assignment) == (1, {"near": 0, "far": 1, "capped": 0})
    assert plan.makespan_s == pytest.approx(1.0 + 0.2 + 2.0)


def test_equal_split_gives_extras_to_the_fastest_and_respects_caps() -> None:
    sources = [src("a", 1), src("b", 3), src("c", 2, max_shards=1)]
    assert apportion(sources, 8, equal_weight) == {"a": 3, "b": 4, "c": 1}
    assert apportion(sources, 2, equal_weight) == {"b": 1, "c": 1}
    assert apportion(sources[2:], 2, equal_weight) is None


def test_proportional_uses_largest_remainder_and_water_fills_caps() -> None:
    sources = [src("a", 3), src("b", 1)]
    assert apportion(sources, 4, bandwidth_weight) == {"a": 3, "b": 1}
    assert apportion(sources, 3, bandwidth_weight) == {"a": 2, "b": 1}  # 2.25 / 0.75
    capped = [src("a", 6, max_shards=2), src("b", 1), src("c", 1)]
    assert apportion(capped, 8, bandwidth_weight) == {"a": 2, "b": 3, "c": 3}


def test_weights_are_exact_fractions() -> None:
    assert bandwidth_weight(src("a", 0.1)) == Fraction(0.1)
    sources = [src(f"u{i}", 0.1) for i in range(3)]
    assert sorted(apportion(sources, 10, bandwidth_weight).values()) == [3, 3, 4]
