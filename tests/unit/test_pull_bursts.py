"""How a pull times each source: bursts from a request to the last byte (no sockets)."""

from __future__ import annotations

import pytest
from chaos_worker.replication.puller import _SourceState

pytestmark = pytest.mark.unit


def test_shards_requested_together_are_one_transfer_from_request_to_last_byte() -> None:
    source = _SourceState("w1", "127.0.0.1:1", 1e6)
    source.requested(10.0)
    source.requested(10.0)
    source.arrived(1000, 10.5)
    assert source.transfers == []
    source.arrived(3000, 11.0)
    assert source.transfers == [(4000, 1.0)]


def test_a_request_while_busy_extends_the_burst_and_an_idle_gap_starts_a_new_one() -> None:
    source = _SourceState("w1", "127.0.0.1:1", 1e6)
    source.requested(0.0)
    source.requested(0.5)  # a re-planned shard queued behind the first: no idle time
    source.arrived(100, 1.0)
    source.arrived(100, 2.0)
    source.requested(5.0)  # idle from 2.0 to 5.0: not counted
    source.arrived(300, 6.0)
    assert source.transfers == [(200, 2.0), (300, 1.0)]
