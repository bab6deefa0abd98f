"""Which figure a join plan uses per source, and the newcomer's downlink probe estimate."""

from __future__ import annotations

import pytest
from chaos_worker.join.plan import source_bandwidths
from chaos_worker.join.probe import estimate
from chaos_worker.telemetry.linktable import LinkTable

pytestmark = pytest.mark.unit

SHAPED = {"w1": 10e6, "w2": 80e6}  # configured rates; w3 has none


def _choose(table: LinkTable, now: float) -> dict:
    return source_bandwidths(["w1", "w2", "w3"], "w4", table, now, shaped=SHAPED.get, default=1e9)


def test_without_measurements_the_shaped_rate_then_the_default_is_used() -> None:
    assert _choose(LinkTable(), now=0.0) == {
        "w1": (10e6, "shaped"),
        "w2": (80e6, "shaped"),
        "w3": (1e9, "default"),
    }


def test_a_fresh_measurement_wins_over_the_configured_shape() -> None:
    table = LinkTable()
    table.observe_transfer("w1", "w4", 1 << 20, 0.5, now=10.0)  # ~2 MB/s, shaped at 10
    table.observe_transfer("w3", "w4", 1 << 20, 0.01, now=10.0)
    table.observe_transfer("w4", "w2", 1 << 20, 0.01, now=10.0)  # the other direction
    chosen = _choose(table, now=11.0)
    assert chosen["w1"] == (pytest.approx((1 << 20) / 0.5), "measured")
    assert chosen["w3"] == (pytest.approx((1 << 20) / 0.01), "measured")
    assert chosen["w2"] == (80e6, "shaped")


def test_a_stale_measurement_is_never_used() -> None:
    table = LinkTable(max_age_s=60.0)
    table.observe_transfer("w1", "w4", 1 << 20, 0.5, now=0.0)
    table.observe_transfer("w3", "w4", 1 << 20, 0.5, now=0.0)
    chosen = _choose(table, now=61.0)
    assert chosen["w1"] == (10e6, "shaped")
    assert chosen["w3"] == (1e9, "default")


def test_a_gossiped_zero_is_not_a_usable_measurement() -> None:
    table = LinkTable()
    table.merge({"bandwidth": {"w1|w4": [0.0, 0.0, 1.0]}}, now=5.0)
    assert _choose(table, now=5.0)["w1"] == (10e6, "shaped")


FRAME = 64 << 10


def test_the_tail_of_the_train_gives_the_steady_rate_after_a_burst() -> None:
    # a 4-frame burst passes at once, then 1 frame per 10 ms: 6.5 MB/s
    arrivals = [0.001] * 4 + [0.011, 0.021, 0.031, 0.041]
    got = estimate(0.0, arrivals, 8, FRAME, timeout_s=1.0)
    assert got.complete
    assert got.bytes_per_s == pytest.approx(4 * FRAME / 0.040)


def test_frames_read_at_once_cannot_make_the_link_look_faster_than_the_whole_train() -> None:
    arrivals = [0.05] * 7 + [0.050001]  # everything sat in a buffer
    got = estimate(0.0, arrivals, 8, FRAME, timeout_s=1.0)
    assert got.bytes_per_s == pytest.approx(8 * FRAME / 0.050001)


def test_an_unfinished_train_keeps_a_slow_link_slow() -> None:
    assert not estimate(0.0, [0.4], 8, FRAME, timeout_s=1.0).complete
    assert estimate(0.0, [0.4], 8, FRAME, timeout_s=1.0).bytes_per_s == FRAME / 1.0
    assert estimate(0.0, [], 8, FRAME, timeout_s=2.0).bytes_per_s == FRAME / 2.0
