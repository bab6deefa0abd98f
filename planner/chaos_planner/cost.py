"""The cost model every solver shares: finish time of a source and makespan of a plan."""

from __future__ import annotations

from collections.abc import Mapping

from chaos_planner.models import Source


def shard_seconds(source: Source, state_bytes: int, shards: int) -> float:
    """Seconds `source` needs per shard: `L_u + W / (K * B_u)`."""
    return source.latency_s + state_bytes / (shards * source.bandwidth_bytes_per_s)


def finish_time(source: Source, count: int, state_bytes: int, shards: int) -> float:
    """When `source` has sent `count` of `shards` shards: `t_u + x_u * (L_u + W / (K * B_u))`."""
    return source.ready_s + count * shard_seconds(source, state_bytes, shards)


def makespan(
    sources: Mapping[str, Source], assignment: Mapping[str, int], state_bytes: int, shards: int
) -> float:
    """Latest finish time over the sources that send at least one shard."""
    return max(
        finish_time(sources[source_id], count, state_bytes, shards)
        for source_id, count in assignment.items()
        if count > 0
    )
