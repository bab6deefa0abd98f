"""How the root plans a join (pure, no I/O): which bandwidth figure per source, and the
planner's shards per source.

A source's link to the newcomer is taken, in this order, from:

* `measured`: a fresh figure of the root's link table for `source -> newcomer` (the
  newcomer's own downlink probes, sent with its join proposal, or gossip from whoever
  measured the link). Stale figures are not used (`LinkTable.bandwidth_of`).
* `shaped`: the emulated rate of the link (local runs with `--links`);
* `default`: `DEFAULT_BANDWIDTH`, a loopback-like figure.

The configured shape is what the link *should* do; the measurement is what it did, so a
measurement always wins. The join plan records the kind of figure used per source.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from chaos_planner.models import DEFAULT_SHARD_COUNTS, PlanRequest, ShardPlan, Source
from chaos_planner.solve import solve

from chaos_worker.telemetry.linktable import LinkTable

Figure = Literal["measured", "shaped", "default"]
MAX_SHARD_BYTES = 1 << 20
"""A join's shards are at most this big: progress, stall detection, re-plans and the
adaptive pull's rebalancing all work shard by shard."""


def shard_plan(state_bytes: int, sources: list[Source], strategy: str) -> ShardPlan:
    """The planner's shards per source for a state of `state_bytes` (shards of at most
    `MAX_SHARD_BYTES`, else the finest count the planner knows)."""
    counts = [k for k in DEFAULT_SHARD_COUNTS if state_bytes / k <= MAX_SHARD_BYTES]
    request = PlanRequest(
        state_bytes=state_bytes,
        shard_counts=counts or [DEFAULT_SHARD_COUNTS[-1]],
        sources=sources,
    )
    return solve(request, strategy)


def source_bandwidths(
    sources: list[str],
    joiner: str,
    table: LinkTable,
    now: float,
    *,
    shaped: Callable[[str], float | None],
    default: float,
) -> dict[str, tuple[float, Figure]]:
    """`{source: (bytes/s, which figure)}` for the links `source -> joiner`."""
    out: dict[str, tuple[float, Figure]] = {}
    for source in sources:
        measured = table.bandwidth_of(source, joiner, now)
        rate = shaped(source)
        if measured is not None and measured > 0:
            out[source] = (measured, "measured")
        elif rate:
            out[source] = (float(rate), "shaped")
        else:
            out[source] = (default, "default")
    return out
