"""Exact greedy shard assignment for a fixed shard count, searched over the chain.

For a fixed K every source's finish times `f_u(1) <= f_u(2) <= ...` form a sorted sequence,
and any assignment takes a prefix of each. Giving each next shard to the source whose
finish time after taking it is smallest therefore takes the K smallest values of the merged
sequences, and its makespan (the K-th smallest) is optimal. See docs/planner.md.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence

from chaos_planner.chain import search_chain
from chaos_planner.cost import shard_seconds
from chaos_planner.models import PlanRequest, ShardPlan, Source


def tie_order(source: Source) -> tuple[float, str]:
    """Among equal finish times, the source with the larger bandwidth, then smaller id, wins."""
    return (-source.bandwidth_bytes_per_s, source.id)


def by_ready_time(sources: Iterable[Source]) -> list[Source]:
    """Sources in the order the greedy admits them to its heap."""
    return sorted(sources, key=lambda source: (source.ready_s, *tie_order(source)))


def greedy_assignment(
    sources: Sequence[Source], state_bytes: int, shards: int, bound: float | None = None
) -> dict[str, int] | None:
    """Shards per source id (sources with none omitted) minimising the makespan for `shards`.

    Pops `(finish after the next shard, -bandwidth, id)` from a min-heap `shards` times.
    Sources enter the heap lazily in order of ready time: one whose ready time exceeds the
    heap's minimum cannot finish a shard before it. Returns None as soon as a popped finish
    time reaches `bound` (the makespan would not beat it), or if the caps cannot hold
    `shards` shards.
    """
    return _greedy_in_order(by_ready_time(sources), state_bytes, shards, bound)


def _greedy_in_order(
    order: Sequence[Source], state_bytes: int, shards: int, bound: float | None
) -> dict[str, int] | None:
    """`greedy_assignment` for sources already sorted by `by_ready_time`."""
    heap: list[tuple[float, float, str, int, int, float, float]] = []
    counts: dict[str, int] = {}
    admitted = 0
    for _ in range(shards):
        while admitted < len(order) and (not heap or order[admitted].ready_s <= heap[0][0]):
            source = order[admitted]
            admitted += 1
            limit = source.shard_limit(shards)
            if limit:
                cost = shard_seconds(source, state_bytes, shards)
                first = source.ready_s + 1 * cost  # finish_time(source, 1, ...)
                heapq.heappush(heap, (first, *tie_order(source), 1, limit, source.ready_s, cost))
        if not heap:
            return None
        finish, negative_bandwidth, source_id, count, limit, ready, cost = heap[0]
        if bound is not None and finish >= bound:
            return None
        counts[source_id] = count
        if count < limit:
            after_next = ready + (count + 1) * cost  # finish_time(source, count + 1, ...)
            entry = (after_next, negative_bandwidth, source_id, count + 1, limit, ready, cost)
            heapq.heapreplace(heap, entry)
        else:
            heapq.heappop(heap)
    return counts


def solve_greedy(request: PlanRequest) -> ShardPlan:
    """Exact optimum over the chain: the greedy for every K, ties to the smaller K.

    A K is abandoned as soon as its greedy pops a finish time no better than the best
    makespan found so far, so the result equals running the greedy to completion for each K.
    """
    order = by_ready_time(request.sources)
    return search_chain(
        request,
        "greedy",
        lambda shards, bound: _greedy_in_order(order, request.state_bytes, shards, bound),
    )
