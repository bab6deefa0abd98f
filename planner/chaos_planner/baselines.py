"""Baseline rules the greedy is compared with: one source, equal split, bandwidth-proportional.

Each is searched over the same chain and priced by the same cost model as the greedy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from fractions import Fraction

from chaos_planner.chain import search_chain
from chaos_planner.cost import finish_time
from chaos_planner.greedy import tie_order
from chaos_planner.models import PlanRequest, ShardPlan, Source


def single_assignment(
    sources: Sequence[Source], state_bytes: int, shards: int
) -> dict[str, int] | None:
    """All shards from the source that finishes them first; None if every cap is too small."""
    able = [source for source in sources if source.shard_limit(shards) == shards]
    if not able:
        return None
    best = min(able, key=lambda s: (finish_time(s, shards, state_bytes, shards), *tie_order(s)))
    return {best.id: shards}


def apportion(
    sources: Sequence[Source], shards: int, weight: Callable[[Source], Fraction]
) -> dict[str, int] | None:
    """Split `shards` in proportion to `weight`, respecting caps; None if the caps cannot hold them.

    Water-filling in exact arithmetic: sources whose cap is below their share get their cap
    and the rest is shared again; the remaining quotas are rounded by largest remainder,
    ties to the larger bandwidth, then the smaller id.
    """
    if sum(source.shard_limit(shards) for source in sources) < shards:
        return None
    counts: dict[str, int] = {}
    free = sorted(sources, key=lambda s: (Fraction(s.shard_limit(shards)) / weight(s), s.id))
    left, left_weight = shards, sum((weight(s) for s in free), Fraction(0))
    while free and free[0].shard_limit(shards) * left_weight < left * weight(free[0]):
        capped = free.pop(0)
        counts[capped.id] = capped.shard_limit(shards)
        left -= counts[capped.id]
        left_weight -= weight(capped)
    quotas = {source.id: left * weight(source) / left_weight for source in free}
    for source in free:
        counts[source.id] = math.floor(quotas[source.id])
    extra = left - sum(counts[source.id] for source in free)
    by_remainder = sorted(free, key=lambda s: (counts[s.id] - quotas[s.id], *tie_order(s)))
    for source in by_remainder[:extra]:
        counts[source.id] += 1
    return {source_id: count for source_id, count in counts.items() if count > 0}


def equal_weight(_source: Source) -> Fraction:
    """Every source counts the same."""
    return Fraction(1)


def bandwidth_weight(source: Source) -> Fraction:
    """A source counts as much as its bandwidth (exactly, as a fraction)."""
    return Fraction(source.bandwidth_bytes_per_s)


def solve_single(request: PlanRequest) -> ShardPlan:
    """Best single source over the chain (with latency, more shards only cost more)."""
    return search_chain(
        request,
        "single",
        lambda shards, _bound: single_assignment(request.sources, request.state_bytes, shards),
    )


def solve_equal(request: PlanRequest) -> ShardPlan:
    """Shards split as equally as the caps allow over all sources, best K of the chain.

    Only K of at least one shard per source are tried (where the chain has one), so that
    every source takes part, as in a naive equal split; otherwise a K smaller than the
    number of sources would quietly leave the slowest out.
    """
    everyone = min(len(request.sources), request.shard_counts[-1])

    def assign(shards: int, _bound: float | None) -> dict[str, int] | None:
        return apportion(request.sources, shards, equal_weight) if shards >= everyone else None

    return search_chain(request, "equal", assign)


def solve_proportional(request: PlanRequest) -> ShardPlan:
    """Shards proportional to bandwidth (largest remainder, caps respected), best K of the chain."""
    return search_chain(
        request,
        "proportional",
        lambda shards, _bound: apportion(request.sources, shards, bandwidth_weight),
    )
