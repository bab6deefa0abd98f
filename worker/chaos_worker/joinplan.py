"""Which bandwidth figure the root plans a join with, per source (pure, no I/O).

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

from chaos_worker.linktable import LinkTable

Figure = Literal["measured", "shaped", "default"]


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
