"""The MILP (CBC) agrees with the greedy: the greedy is optimal for every chain."""

from __future__ import annotations

import math

import pytest
from chaos_planner import PlanningError, PlanRequest, Source
from chaos_planner.greedy import solve_greedy
from chaos_planner.milp import solve_milp
from hypothesis import HealthCheck, given, settings

from tests.unit.test_planner_strategies import requests

pytestmark = pytest.mark.unit


def assert_same_optimum(request: PlanRequest) -> None:
    try:
        greedy = solve_greedy(request)
    except PlanningError:
        with pytest.raises(PlanningError):
            solve_milp(request)
        return
    milp = solve_milp(request)
    assert math.isclose(milp.makespan_s, greedy.makespan_s, rel_tol=1e-7, abs_tol=1e-9)
    assert sum(milp.assignment.values()) == milp.shards
    for source in request.sources:
        assert 0 <= milp.assignment[source.id] <= source.shard_limit(milp.shards)


# Each example solves up to five small MILPs with CBC (a few ms each).
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests(max_sources=6, max_shards=16))
def test_greedy_equals_milp_on_random_instances(request: PlanRequest) -> None:
    assert_same_optimum(request)


@pytest.mark.parametrize(
    "sources",
    [
        pytest.param([Source(id="only", bandwidth_bytes_per_s=3e6, latency_s=0.01)], id="one"),
        pytest.param(
            [Source(id=f"u{i}", bandwidth_bytes_per_s=1e6) for i in range(5)], id="equal-ties"
        ),
        pytest.param(
            [
                Source(id="a", bandwidth_bytes_per_s=8e6, max_shards=2),
                Source(id="b", bandwidth_bytes_per_s=1e6, max_shards=0),
                Source(id="c", bandwidth_bytes_per_s=2e6, latency_s=0.02, ready_s=0.3),
                Source(id="d", bandwidth_bytes_per_s=5e5, max_shards=16),
            ],
            id="caps",
        ),
        pytest.param(
            [
                Source(id=f"u{i}", bandwidth_bytes_per_s=1e6 * (i + 1), ready_s=0.1 * i)
                for i in range(6)
            ],
            id="staggered",
        ),
    ],
)
def test_greedy_equals_milp_on_chosen_instances(sources: list[Source]) -> None:
    assert_same_optimum(
        PlanRequest(state_bytes=10**7, shard_counts=[1, 2, 4, 8, 16], sources=sources)
    )
