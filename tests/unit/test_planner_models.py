"""Validation of planner inputs, and infeasibility reported as PlanningError."""

from __future__ import annotations

import pytest
from chaos_planner import PlanningError, PlanRequest, Source, solve
from chaos_planner.models import DEFAULT_SHARD_COUNTS
from pydantic import ValidationError

pytestmark = pytest.mark.unit

GOOD_SOURCE = {"id": "a", "bandwidth_bytes_per_s": 1e6}


def request(**fields) -> dict:
    return {"state_bytes": 1000, "sources": [GOOD_SOURCE], **fields}


def error_of(data: dict) -> tuple[tuple, str]:
    with pytest.raises(ValidationError) as caught:
        PlanRequest.model_validate(data)
    first = caught.value.errors()[0]
    return tuple(first["loc"]), first["msg"]


def test_defaults() -> None:
    source = Source(id="a", bandwidth_bytes_per_s=10)
    assert (source.latency_s, source.ready_s, source.max_shards) == (0.0, 0.0, None)
    parsed = PlanRequest.model_validate(request())
    assert parsed.shard_counts == list(DEFAULT_SHARD_COUNTS) == [2**i for i in range(11)]


@pytest.mark.parametrize(
    ("data", "loc"),
    [
        ({"sources": [GOOD_SOURCE]}, ("state_bytes",)),
        (request(state_bytes=0), ("state_bytes",)),
        (request(state_bytes=-5), ("state_bytes",)),
        (request(state_bytes=1.5), ("state_bytes",)),
        (request(state_bytes=True), ("state_bytes",)),
        (request(state_bytes="1000"), ("state_bytes",)),
        (request(sources=[]), ("sources",)),
        ({"state_bytes": 1}, ("sources",)),
        (request(sources=[{"id": "a"}]), ("sources", 0, "bandwidth_bytes_per_s")),
        (request(sources=[{"id": "", "bandwidth_bytes_per_s": 1}]), ("sources", 0, "id")),
        (
            request(sources=[GOOD_SOURCE, {"id": "b", "bandwidth_bytes_per_s": 0}]),
            ("sources", 1, "bandwidth_bytes_per_s"),
        ),
        (
            request(sources=[{"id": "b", "bandwidth_bytes_per_s": float("inf")}]),
            ("sources", 0, "bandwidth_bytes_per_s"),
        ),
        (
            request(sources=[{**GOOD_SOURCE, "latency_s": -0.1}]),
            ("sources", 0, "latency_s"),
        ),
        (
            request(sources=[{**GOOD_SOURCE, "ready_s": float("nan")}]),
            ("sources", 0, "ready_s"),
        ),
        (request(sources=[{**GOOD_SOURCE, "max_shards": -1}]), ("sources", 0, "max_shards")),
        (request(sources=[{**GOOD_SOURCE, "colour": "red"}]), ("sources", 0, "colour")),
        (request(sources=[GOOD_SOURCE, GOOD_SOURCE]), ("sources",)),
        (request(shard_counts=[]), ("shard_counts",)),
        (request(shard_counts=[0, 2]), ("shard_counts", 0)),
        (request(shard_counts=[1, 2**21]), ("shard_counts", 1)),
        (request(shard_counts=[2, 3]), ("shard_counts",)),
        (request(shard_counts=[4, 2]), ("shard_counts",)),
        (request(shard_counts=[2, 2]), ("shard_counts",)),
        (request(extra=1), ("extra",)),
    ],
)
def test_bad_input_is_rejected_at_its_field(data: dict, loc: tuple) -> None:
    assert error_of(data)[0] == loc


def test_chain_error_names_the_breaking_pair() -> None:
    _, message = error_of(request(shard_counts=[1, 2, 4, 6]))
    assert "shard_counts[2]=4 does not divide shard_counts[3]=6" in message
    _, message = error_of(request(shard_counts=[1, 4, 4]))
    assert "shard_counts[1]=4 >= shard_counts[2]=4" in message


def test_duplicate_ids_are_named() -> None:
    _, message = error_of(request(sources=[GOOD_SOURCE, {**GOOD_SOURCE, "id": "b"}, GOOD_SOURCE]))
    assert "sources[0] and sources[2]" in message


@pytest.mark.parametrize("solver", ["greedy", "milp", "equal", "proportional", "single"])
def test_caps_that_hold_no_chain_element_raise_planning_error(solver: str) -> None:
    capped = PlanRequest(
        state_bytes=100,
        shard_counts=[4, 8],
        sources=[
            Source(id="a", bandwidth_bytes_per_s=1, max_shards=1),
            Source(id="b", bandwidth_bytes_per_s=1, max_shards=2),
        ],
    )
    with pytest.raises(PlanningError, match=r"^sources\[\*\]\.max_shards: .*shard_counts"):
        solve(capped, solver)


def test_single_without_a_source_that_holds_everything_raises() -> None:
    capped = PlanRequest(
        state_bytes=100,
        shard_counts=[2, 4],
        sources=[Source(id=s, bandwidth_bytes_per_s=1, max_shards=1) for s in "ab"],
    )
    assert solve(capped).shards == 2
    with pytest.raises(PlanningError, match=r"^sources\[\*\]\.max_shards"):
        solve(capped, "single")


def test_unknown_solver() -> None:
    with pytest.raises(ValueError, match="unknown solver"):
        solve(PlanRequest.model_validate(request()), "magic")


def test_transfer_time_overflow_is_a_planning_error() -> None:
    tiny = PlanRequest.model_validate(
        request(state_bytes=10**9, sources=[{"id": "a", "bandwidth_bytes_per_s": 1e-310}])
    )
    with pytest.raises(PlanningError, match="bandwidth_bytes_per_s"):
        solve(tiny)


def test_shard_indices_are_contiguous_runs_largest_share_first() -> None:
    from chaos_planner.models import ShardPlan

    plan = ShardPlan(
        solver="greedy",
        shards=6,
        shard_bytes=1.0,
        assignment={"b": 1, "a": 3, "c": 0, "d": 2},
        makespan_s=1.0,
    )
    assert plan.shard_indices() == {"a": [0, 1, 2], "d": [3, 4], "b": [5]}
