"""Hypothesis strategies for planner tests (shared), with a sanity test of their output."""

from __future__ import annotations

from itertools import pairwise

import pytest
from chaos_planner import PlanRequest, Source
from hypothesis import given
from hypothesis import strategies as st

pytestmark = pytest.mark.unit

# Few distinct values make ties (equal bandwidths, equal finish times) common.
BANDWIDTHS = st.one_of(
    st.sampled_from([1e6, 2e6, 4e6, 5e6, 1e7]), st.floats(1e5, 1e8, allow_nan=False)
)
LATENCIES = st.one_of(st.sampled_from([0.0, 0.001, 0.01, 0.05]), st.floats(0.0, 0.1))
READY = st.one_of(st.sampled_from([0.0, 0.0, 0.1, 0.5]), st.floats(0.0, 1.0))


@st.composite
def chains(draw: st.DrawFn, max_shards: int = 16) -> list[int]:
    """A strictly increasing divisibility chain with elements <= max_shards."""
    chain = [draw(st.integers(1, min(3, max_shards)))]
    while chain[-1] * 2 <= max_shards and draw(st.booleans()):
        factors = [f for f in (2, 3, 4) if chain[-1] * f <= max_shards]
        chain.append(chain[-1] * draw(st.sampled_from(factors)))
    return chain


@st.composite
def sources(draw: st.DrawFn, max_sources: int = 6, max_cap: int = 16) -> list[Source]:
    """One to `max_sources` sources with unique ids, some with caps."""
    count = draw(st.integers(1, max_sources))
    ids = draw(st.permutations([f"u{i}" for i in range(count)]))
    return [
        Source(
            id=source_id,
            bandwidth_bytes_per_s=draw(BANDWIDTHS),
            latency_s=draw(LATENCIES),
            ready_s=draw(READY),
            max_shards=draw(st.one_of(st.none(), st.none(), st.integers(0, max_cap))),
        )
        for source_id in ids
    ]


@st.composite
def requests(draw: st.DrawFn, max_sources: int = 6, max_shards: int = 16) -> PlanRequest:
    """A plan request; its caps may make it infeasible."""
    return PlanRequest(
        state_bytes=draw(st.sampled_from([1, 1000, 10**6, 10**8, 2**30])),
        shard_counts=draw(chains(max_shards)),
        sources=draw(sources(max_sources, max_shards)),
    )


@given(requests())
def test_requests_are_valid_chains_with_unique_ids(request: PlanRequest) -> None:
    counts = request.shard_counts
    assert all(b % a == 0 and b > a for a, b in pairwise(counts))
    assert len({s.id for s in request.sources}) == len(request.sources)
