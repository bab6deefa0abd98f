"""The greedy is exact: test vector, plain-greedy and exhaustive references, optimality rules."""

from __future__ import annotations

import itertools
import math
import random
import time

import pytest
from chaos_planner import PlanningError, PlanRequest, Source, solve
from chaos_planner.chain import feasible_shard_counts
from chaos_planner.cost import finish_time, makespan
from chaos_planner.greedy import greedy_assignment, solve_greedy
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tests.unit.test_planner_strategies import requests

pytestmark = pytest.mark.unit

MB = 1_000_000
PAPER = PlanRequest(
    state_bytes=100 * MB,
    shard_counts=[1, 2, 4],
    sources=[
        Source(id="a", bandwidth_bytes_per_s=100 * MB),
        Source(id="b", bandwidth_bytes_per_s=50 * MB),
    ],
)


def plain_greedy(request: PlanRequest, shards: int) -> dict[str, int]:
    """Reference: give each shard to the source finishing first after taking it (O(K*n))."""
    counts = {s.id: 0 for s in request.sources}
    for _ in range(shards):
        able = [s for s in request.sources if counts[s.id] < s.shard_limit(shards)]
        best = min(
            able,
            key=lambda s: (
                finish_time(s, counts[s.id] + 1, request.state_bytes, shards),
                -s.bandwidth_bytes_per_s,
                s.id,
            ),
        )
        counts[best.id] += 1
    return {source_id: n for source_id, n in counts.items() if n}


def exhaustive_makespan(request: PlanRequest, shards: int) -> float:
    """Reference: the best makespan over every assignment of `shards` shards."""
    limits = [range(s.shard_limit(shards) + 1) for s in request.sources]
    return min(
        makespan(
            request.by_id, dict(zip(request.by_id, xs, strict=True)), request.state_bytes, shards
        )
        for xs in itertools.product(*limits)
        if sum(xs) == shards
    )


def feasible(request: PlanRequest) -> bool:
    try:
        feasible_shard_counts(request)
    except PlanningError:
        return False
    return True


def test_paper_vector_k4() -> None:
    assignment = greedy_assignment(PAPER.sources, PAPER.state_bytes, 4)
    assert assignment == {"a": 3, "b": 1}
    assert makespan(PAPER.by_id, assignment, PAPER.state_bytes, 4) == pytest.approx(0.75)
    for alternative in ({"a": 2, "b": 2}, {"a": 4}):
        assert makespan(PAPER.by_id, alternative, PAPER.state_bytes, 4) == pytest.approx(1.0)


def test_paper_vector_chain_and_k3() -> None:
    per_k = [
        makespan(
            PAPER.by_id,
            greedy_assignment(PAPER.sources, PAPER.state_bytes, k),
            PAPER.state_bytes,
            k,
        )
        for k in (1, 2, 4)
    ]
    assert per_k == pytest.approx([1.0, 1.0, 0.75])
    plan = solve(PAPER)
    assert (plan.solver, plan.shards, plan.assignment) == ("greedy", 4, {"a": 3, "b": 1})
    assert plan.shard_bytes == 25 * MB
    assert plan.makespan_s == pytest.approx(0.75)
    k3 = greedy_assignment(PAPER.sources, PAPER.state_bytes, 3)
    assert k3 == {"a": 2, "b": 1}
    assert makespan(PAPER.by_id, k3, PAPER.state_bytes, 3) == pytest.approx(2 / 3)


def test_ties_prefer_larger_bandwidth_then_smaller_id_then_smaller_k() -> None:
    # a and b finish their first shard at the same time; b is faster but starts later.
    tied = PlanRequest(
        state_bytes=100,
        shard_counts=[1],
        sources=[
            Source(id="a", bandwidth_bytes_per_s=100, ready_s=0.5),
            Source(id="b", bandwidth_bytes_per_s=200, ready_s=1.0),
        ],
    )
    assert solve(tied).assignment == {"a": 0, "b": 1}
    twins = PlanRequest(
        state_bytes=100,
        shard_counts=[1, 2],
        sources=[Source(id=i, bandwidth_bytes_per_s=100, latency_s=1.0) for i in "yx"],
    )
    plan = solve(twins)  # K=1: 2.0 s; K=2: x and y in parallel, also 1.0 + 0.5 = 1.5 s
    assert (plan.shards, plan.assignment) == (2, {"y": 1, "x": 1})
    flat = PlanRequest(
        state_bytes=100, shard_counts=[1, 2], sources=[Source(id="a", bandwidth_bytes_per_s=100)]
    )
    assert solve(flat).shards == 1  # 1.0 s either way: the smaller K wins


@settings(max_examples=150, deadline=None)
@given(requests(max_sources=8, max_shards=64))
def test_greedy_is_the_plain_greedy(request: PlanRequest) -> None:
    for shards in request.shard_counts:
        if sum(s.shard_limit(shards) for s in request.sources) >= shards:
            assert greedy_assignment(request.sources, request.state_bytes, shards) == plain_greedy(
                request, shards
            )
        else:
            assert greedy_assignment(request.sources, request.state_bytes, shards) is None


@settings(max_examples=150, deadline=None)
@given(requests(max_sources=3, max_shards=6))
def test_greedy_matches_exhaustive_search(request: PlanRequest) -> None:
    assume(feasible(request))
    plan = solve_greedy(request)
    best = min((exhaustive_makespan(request, k), k) for k in feasible_shard_counts(request))
    assert math.isclose(plan.makespan_s, best[0], rel_tol=1e-12, abs_tol=1e-15)


@settings(max_examples=100, deadline=None)
@given(requests(max_sources=6, max_shards=64), st.floats(0.0, 20.0))
def test_bound_abandons_exactly_the_shard_counts_that_cannot_win(
    request: PlanRequest, bound: float
) -> None:
    for shards in feasible_shard_counts(request) if feasible(request) else []:
        full = greedy_assignment(request.sources, request.state_bytes, shards)
        value = makespan(request.by_id, full, request.state_bytes, shards)
        bounded = greedy_assignment(request.sources, request.state_bytes, shards, bound)
        assert bounded == (full if value < bound else None)


@settings(max_examples=100, deadline=None)
@given(requests(max_sources=6, max_shards=64), st.randoms(use_true_random=False))
def test_plan_rules(request: PlanRequest, rng: random.Random) -> None:
    assume(feasible(request))
    plan = solve_greedy(request)
    assert sum(plan.assignment.values()) == plan.shards
    assert plan.shards in request.shard_counts
    assert plan.shard_bytes == request.state_bytes / plan.shards
    for source in request.sources:
        count = plan.assignment[source.id]
        assert 0 <= count <= source.shard_limit(plan.shards)
        if source.ready_s >= plan.makespan_s:  # R1: too late to help, sends nothing
            assert count == 0
    shuffled = list(request.sources)
    rng.shuffle(shuffled)  # R3: the optimum does not depend on the order of sources
    again = solve_greedy(request.model_copy(update={"sources": shuffled}))
    assert (again.shards, again.makespan_s) == (plan.shards, plan.makespan_s)
    assert again.assignment == plan.assignment


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.floats(1e5, 1e8), min_size=2, max_size=6),
    st.floats(0, 0.05),
    st.floats(0, 0.5),
    st.sampled_from([1, 7, 16, 64]),
)
def test_more_bandwidth_never_gets_fewer_shards(
    bandwidths: list[float], latency: float, ready: float, shards: int
) -> None:
    # R2: with equal latency and ready time, shard counts are monotone in bandwidth.
    sources = [
        Source(id=f"u{i}", bandwidth_bytes_per_s=b, latency_s=latency, ready_s=ready)
        for i, b in enumerate(bandwidths)
    ]
    counts = greedy_assignment(sources, 10**8, shards)
    # Ascending preference: bandwidth, then (for equal bandwidths) the larger id first.
    by_id_descending = sorted(sources, key=lambda s: s.id, reverse=True)
    ranked = sorted(by_id_descending, key=lambda s: s.bandwidth_bytes_per_s)
    got = [counts.get(s.id, 0) for s in ranked]
    assert got == sorted(got)


def test_a_source_that_is_late_gets_nothing_and_caps_bind() -> None:
    request = PlanRequest(
        state_bytes=1000,
        shard_counts=[8],
        sources=[
            Source(id="fast", bandwidth_bytes_per_s=1000, max_shards=3),
            Source(id="slow", bandwidth_bytes_per_s=100),
            Source(id="late", bandwidth_bytes_per_s=10**9, ready_s=100.0),
        ],
    )
    plan = solve(request)
    assert plan.assignment == {"fast": 3, "slow": 5, "late": 0}


def test_fast_enough_for_a_thousand_sources() -> None:
    rng = random.Random(7)
    request = PlanRequest(
        state_bytes=2**30,
        shard_counts=[2**i for i in range(13)],
        sources=[
            Source(
                id=f"s{i}",
                bandwidth_bytes_per_s=rng.uniform(1e6, 1e8),
                latency_s=rng.uniform(0, 0.05),
                ready_s=rng.uniform(0, 0.5),
            )
            for i in range(1000)
        ],
    )
    start = time.perf_counter()
    solve_greedy(request)
    # About 10 ms on a busy 2-core machine; the margin only catches complexity regressions.
    assert time.perf_counter() - start < 0.5
