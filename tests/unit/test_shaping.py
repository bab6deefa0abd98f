"""Link shape parsing and the token bucket's arithmetic (no sleeping)."""

from __future__ import annotations

import pytest
from chaos_worker.net.shaping import (
    LinkShape,
    ShapeError,
    TokenBucket,
    parse_links,
    parse_rate,
    shape_for,
)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("text", "rate"),
    [("25MB/s", 25e6), ("1.5GB/s", 1.5e9), ("800KB/s", 8e5), ("2MiB/s", 2 << 20), ("10B/s", 10)],
)
def test_rates_parse(text: str, rate: float) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["25MB", "fast", "-1MB/s", "0MB/s", "25 Mb/s"])
def test_bad_rates_are_rejected(text: str) -> None:
    with pytest.raises(ShapeError):
        parse_rate(text)


def test_links_name_pairs_in_either_order_and_a_default() -> None:
    shapes = parse_links("w3-w0=20MB/s+40ms,*=100MB/s")
    assert shape_for(shapes, "w0", "w3") == LinkShape(20e6, 0.04)
    assert shape_for(shapes, "w3", "w0") == LinkShape(20e6, 0.04)
    assert shape_for(shapes, "w1", "w2") == LinkShape(100e6, 0.0)
    assert shape_for(parse_links("none"), "w1", "w2") == LinkShape()


@pytest.mark.parametrize("spec", ["w0=20MB/s", "w0-w1", "w0-w1=20MB/s+40", "w0-w1=+x"])
def test_bad_link_specs_name_the_item(spec: str) -> None:
    with pytest.raises(ShapeError, match="--links"):
        parse_links(spec)


def test_bucket_lets_a_burst_through_then_paces_at_the_rate() -> None:
    bucket = TokenBucket(1000.0, burst=500)
    now = bucket._stamp
    assert bucket.wait_s(500, now) == 0.0
    assert bucket.wait_s(1000, now) == pytest.approx(1.0)
    # after the debt is paid off the next bytes wait only for themselves
    assert bucket.wait_s(100, now + 1.0) == pytest.approx(0.1)


def test_bucket_refills_no_more_than_its_burst() -> None:
    bucket = TokenBucket(1000.0, burst=200)
    now = bucket._stamp
    assert bucket.wait_s(400, now + 100.0) == pytest.approx(0.2)
