"""Link-table gossip: the wire message's validation and what a merge takes in."""

from __future__ import annotations

import json

import pytest
from chaos_worker.net.wire import (
    MAX_LINK_ENTRIES,
    LinkGossip,
    Proposal,
    WireError,
    decode_header,
    encode,
)
from chaos_worker.telemetry.linktable import MAX_FIGURE, LinkTable

pytestmark = pytest.mark.unit


def _table() -> LinkTable:
    table = LinkTable()
    table.observe_transfer("w1", "w4", 1 << 20, 0.1, now=100.0)  # 10.5 MB/s
    table.observe_transfer("w2", "w4", 1 << 20, 0.0125, now=104.0)  # 84 MB/s
    table.observe_rtt("w1", "w2", 0.002, now=105.0)
    return table


def _raw_gossip(entries: dict) -> bytes:
    """A gossip header as a peer might send it, bypassing our own validation."""
    return json.dumps({"type": "links", "sender": "w9", "links": entries}).encode()


def test_a_shared_table_travels_and_merges_to_the_same_figures() -> None:
    sender = _table()
    message = LinkGossip(sender="w1", links=sender.share(now=110.0))
    decoded = decode_header(b"".join(bytes(part) for part in encode(message))[8:])
    receiver = LinkTable()
    # the receiver's clock is elsewhere: ages, not times, travel
    assert receiver.merge(decoded.links, now=5000.0) == 3
    got = receiver.bandwidth("w1", "w4", now=5000.0)
    assert got.value == pytest.approx((1 << 20) / 0.1) and got.age_s == pytest.approx(10.0)
    assert receiver.bandwidth_of("w2", "w4", 5000.0) == pytest.approx((1 << 20) / 0.0125)
    assert receiver.rtt("w1", "w2", now=5000.0).value == pytest.approx(0.002)


@pytest.mark.parametrize(
    "entries",
    [
        {"bandwidth": {"w1|w4": ["NaN", 1.0, 1.0]}},
        {"bandwidth": {"w1|w4": [float("nan"), 1.0, 1.0]}},
        {"bandwidth": {"w1|w4": [float("inf"), 1.0, 1.0]}},
        {"bandwidth": {"w1|w4": [-5.0, 1.0, 1.0]}},
        {"bandwidth": {"w1|w4": [MAX_FIGURE["bandwidth"] * 2, 1.0, 1.0]}},
        {"rtt": {"w1|w4": [MAX_FIGURE["rtt"] + 1, 1.0, 1.0]}},
        {"bandwidth": {"w1|w4": [1e6, -1.0, 1.0]}},
        {"bandwidth": {"w1|w4": [1e6, 1e9, 1.0]}},
        {"bandwidth": {"w1|w4": [1e6, 1.0, 0.0]}},
        {"bandwidth": {"w1|w4": [1e6, 1.0]}},
        {"bandwidth": {"w1|w1": [1e6, 1.0, 1.0]}},
        {"bandwidth": {"w1-w4": [1e6, 1.0, 1.0]}},
        {"bandwidth": {"w1|w4|w5": [1e6, 1.0, 1.0]}},
        {"bandwidth": {"w1|" + "x" * 100: [1e6, 1.0, 1.0]}},
        {"latency": {"w1|w4": [1e6, 1.0, 1.0]}},
        {"bandwidth": {"w1|w4": ["fast", 1.0, 1.0]}},
    ],
)
def test_implausible_or_malformed_figures_are_rejected_on_the_wire(entries: dict) -> None:
    raw = _raw_gossip(entries).replace(b"Infinity", b"1e999")
    with pytest.raises(WireError):
        decode_header(raw)


def test_the_entry_count_is_bounded() -> None:
    entries = {f"a{i}|b{i}": [1e6, 1.0, 1.0] for i in range(MAX_LINK_ENTRIES)}
    assert decode_header(_raw_gossip({"bandwidth": entries})).type == "links"
    entries["c|d"] = [1e6, 1.0, 1.0]
    with pytest.raises(WireError):
        decode_header(_raw_gossip({"bandwidth": entries}))


def test_a_join_proposal_carries_validated_figures_too() -> None:
    good = Proposal(
        id="p",
        origin="w4",
        kind="join",
        subject="w4",
        address="127.0.0.1:9004",
        detected_at=1.0,
        epoch=-1,
        mode="observe",
        links={"bandwidth": {"w1|w4": (1e7, 0.1, 1.0)}},
    )
    assert decode_header(encode(good)[1]).links == good.links
    bad = json.loads(good.model_dump_json())
    bad["links"]["bandwidth"]["w1|w4"][0] = -1.0
    with pytest.raises(WireError):
        decode_header(json.dumps(bad).encode())


def test_share_keeps_the_freshest_within_the_limit_and_drops_stale_ones() -> None:
    table = _table()
    limited = table.share(now=110.0, limit=2)
    assert limited["rtt"] == {"w1|w2": [0.002, 5.0, 1.0]}
    assert list(limited["bandwidth"]) == ["w2|w4"]
    table.observe_rtt("w0", "w1", 0.001, now=0.0)  # 110 s old: stale
    assert "w0|w1" in table.share(now=110.0)["rtt"]
    assert "w0|w1" not in table.share(now=110.0, fresh_only=True)["rtt"]


def test_implausible_own_figures_are_never_shared() -> None:
    table = LinkTable()
    table.observe_transfer("w1", "w2", 1 << 30, 1e-6, now=0.0)  # 1 PB/s: a clock glitch
    assert table.share(now=0.0)["bandwidth"] == {}


def test_merge_takes_only_accepted_links_and_nothing_from_a_bad_table() -> None:
    shared = _table().share(now=110.0)
    table = LinkTable()
    taken = table.merge(shared, now=110.0, accept=lambda src, dst: dst == "w4" and src == "w1")
    assert taken == 1 and table.bandwidth_of("w2", "w4", 110.0) is None
    shared["bandwidth"]["w3|w4"] = [-1.0, 0.0, 1.0]
    fresh = LinkTable()
    with pytest.raises(ValueError, match="implausible"):
        fresh.merge(shared, now=110.0)
    assert fresh.readings(110.0) == []  # all or nothing


def test_an_old_shared_figure_never_replaces_a_newer_one_here() -> None:
    mine = LinkTable()
    mine.observe_transfer("w1", "w4", 1 << 20, 0.01, now=100.0)
    theirs = LinkTable()
    theirs.observe_transfer("w1", "w4", 1 << 20, 1.0, now=50.0)
    assert mine.merge(theirs.share(now=60.0), now=101.0) == 0
    assert mine.bandwidth_of("w1", "w4", 101.0) == pytest.approx((1 << 20) / 0.01)
