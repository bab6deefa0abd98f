"""The search over the divisibility chain of shard counts that every solver shares."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from chaos_planner.cost import makespan
from chaos_planner.errors import PlanningError
from chaos_planner.models import PlanRequest, ShardPlan

Assign = Callable[[int, float | None], Mapping[str, int] | None]
"""`assign(shards, bound)`: shards per source id for this shard count, or None when the
rule has no plan for it or (optionally) when it cannot beat makespan `bound`."""


def capacity(request: PlanRequest, shards: int) -> int:
    """How many of `shards` shards the sources can hold together, given their caps."""
    return sum(source.shard_limit(shards) for source in request.sources)


def feasible_shard_counts(request: PlanRequest) -> list[int]:
    """The shard counts of the chain the caps can hold; PlanningError if there is none."""
    if any(source.max_shards is None for source in request.sources):
        return list(request.shard_counts)
    counts = [k for k in request.shard_counts if capacity(request, k) >= k]
    if not counts:
        smallest = request.shard_counts[0]
        raise PlanningError(
            f"sources[*].max_shards: the caps hold {capacity(request, smallest)} shards in "
            f"total, fewer than the smallest element of shard_counts ({smallest})"
        )
    return counts


def make_plan(
    request: PlanRequest, solver: str, shards: int, assignment: Mapping[str, int]
) -> ShardPlan:
    """A ShardPlan listing every source (0 for those that send nothing), priced by `makespan`."""
    value = makespan(request.by_id, assignment, request.state_bytes, shards)
    if not math.isfinite(value):
        raise PlanningError(
            "sources[*].bandwidth_bytes_per_s: too small, the transfer time is not finite"
        )
    return ShardPlan(
        solver=solver,
        shards=shards,
        shard_bytes=request.state_bytes / shards,
        assignment={source.id: assignment.get(source.id, 0) for source in request.sources},
        makespan_s=value,
    )


def search_chain(request: PlanRequest, solver: str, assign: Assign) -> ShardPlan:
    """Best plan over the feasible shard counts: smallest makespan, ties to the smaller K."""
    best_shards, best_assignment, best_makespan = 0, None, 0.0
    for shards in feasible_shard_counts(request):
        assignment = assign(shards, None if best_assignment is None else best_makespan)
        if assignment is None:
            continue
        value = makespan(request.by_id, assignment, request.state_bytes, shards)
        if best_assignment is None or value < best_makespan:
            best_shards, best_assignment, best_makespan = shards, assignment, value
    if best_assignment is None:
        raise PlanningError(
            f"sources[*].max_shards: solver {solver!r} finds no plan for any element of "
            f"shard_counts {request.shard_counts}"
        )
    return make_plan(request, solver, best_shards, best_assignment)
