"""The link table: EWMAs of RTT, bandwidth and speed, staleness, sharing between members."""

from __future__ import annotations

import math

import pytest
from chaos_worker.telemetry.linktable import MIN_TRANSFER_BYTES, LinkTable
from hypothesis import given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.unit

MiB = 1 << 20


def test_first_sample_is_taken_as_is_then_ewma():
    table = LinkTable(alpha=0.5)
    table.observe_rtt("a", "b", 0.010, now=1.0)
    assert table.rtt("a", "b", now=1.0).value == pytest.approx(0.010)
    table.observe_rtt("a", "b", 0.030, now=2.0)
    reading = table.rtt("a", "b", now=2.5)
    assert reading.value == pytest.approx(0.020)
    assert reading.age_s == pytest.approx(0.5)
    assert reading.samples == 2
    assert not reading.stale


def test_links_are_directed():
    table = LinkTable()
    table.observe_transfer("a", "b", 10 * MiB, 1.0, now=0.0)
    assert table.bandwidth_of("a", "b", now=0.0) == pytest.approx(10 * MiB)
    assert table.bandwidth_of("b", "a", now=0.0) is None
    assert table.rtt("a", "b", now=0.0) is None


def test_small_transfers_are_ignored():
    table = LinkTable()
    assert not table.observe_transfer("a", "b", MIN_TRANSFER_BYTES - 1, 1e-6, now=0.0)
    assert table.bandwidth("a", "b", now=0.0) is None
    assert table.observe_transfer("a", "b", MIN_TRANSFER_BYTES, 0.5, now=0.0)
    assert table.bandwidth_of("a", "b", now=0.0) == pytest.approx(2 * MIN_TRANSFER_BYTES)


def test_stale_figures_are_reported_with_their_age_but_not_used():
    table = LinkTable(max_age_s=10.0)
    table.observe_transfer("a", "b", 4 * MiB, 2.0, now=100.0)
    table.observe_rtt("a", "b", 0.001, now=100.0)
    assert table.bandwidth_of("a", "b", now=110.0) == pytest.approx(2 * MiB)
    reading = table.bandwidth("a", "b", now=115.0)
    assert reading.stale and reading.age_s == pytest.approx(15.0)
    assert reading.value == pytest.approx(2 * MiB)
    assert table.bandwidth_of("a", "b", now=115.0) is None
    assert table.bandwidths_from(["a"], "b", now=115.0, default=7.0) == {"a": 7.0}
    rows = table.readings(now=115.0)
    assert [(r.kind, r.stale, r.age_s) for r in rows] == [
        ("bandwidth", True, 15.0),
        ("rtt", True, 15.0),
    ]
    exported = table.as_dict(now=115.0)
    assert exported["a|b"]["bandwidth"] == {"value": 2 * MiB, "age_s": 15.0, "stale": True}
    # a new measurement makes the figure fresh again
    table.observe_transfer("a", "b", 4 * MiB, 1.0, now=116.0)
    assert table.bandwidth("a", "b", now=116.0).stale is False


def test_bandwidths_from_mixes_measured_and_default():
    table = LinkTable()
    table.observe_transfer("s1", "new", 8 * MiB, 1.0, now=0.0)
    table.observe_transfer("s2", "other", 8 * MiB, 1.0, now=0.0)
    got = table.bandwidths_from(["s1", "s2", "s3"], "new", now=1.0, default=1e6)
    assert got == {"s1": pytest.approx(8 * MiB), "s2": 1e6, "s3": 1e6}


def test_stale_links_lists_links_without_a_fresh_bandwidth():
    table = LinkTable(max_age_s=5.0)
    table.observe_transfer("a", "b", MiB, 0.1, now=0.0)
    table.observe_transfer("b", "c", MiB, 0.1, now=8.0)
    table.observe_rtt("a", "c", 0.001, now=8.0)  # an RTT is no bandwidth
    links = [("a", "b"), ("b", "c"), ("a", "c")]
    assert table.stale_links(links, now=9.0) == [("a", "b"), ("a", "c")]


def test_speed_is_an_ewma_of_samples_per_second():
    table = LinkTable(alpha=0.5)
    assert not table.observe_step("w0", 0, 0.2, now=0.0)  # nothing computed: no sample
    assert table.observe_step("w0", 100, 1.0, now=1.0)
    assert table.observe_step("w0", 300, 1.0, now=2.0)
    assert table.speed("w0", now=2.0).value == pytest.approx(200.0)
    assert table.speeds(["w0", "w1"], now=2.0, default=1.0) == {"w0": 200.0, "w1": 1.0}
    assert table.speeds(["w0"], now=1000.0, default=1.0) == {"w0": 1.0}  # stale


def test_forget_drops_every_figure_of_a_member():
    table = LinkTable()
    table.observe_rtt("a", "b", 0.001, now=0.0)
    table.observe_rtt("b", "c", 0.001, now=0.0)
    table.observe_transfer("c", "b", MiB, 0.1, now=0.0)
    table.observe_rtt("a", "c", 0.001, now=0.0)
    table.observe_step("b", 10, 1.0, now=0.0)
    table.forget("b")
    assert [(r.src, r.dst) for r in table.readings(now=0.0)] == [("a", "c")]
    assert table.speed("b", now=0.0) is None


@pytest.mark.parametrize(
    "call",
    [
        lambda t: t.observe_rtt("a", "b", -0.1, now=0.0),
        lambda t: t.observe_rtt("a", "b", math.nan, now=0.0),
        lambda t: t.observe_transfer("a", "b", MiB, 0.0, now=0.0),
        lambda t: t.observe_transfer("a", "b", -1, 1.0, now=0.0),
        lambda t: t.observe_step("a", 10, math.inf, now=0.0),
    ],
)
def test_nonsense_measurements_are_refused(call):
    with pytest.raises(ValueError):
        call(LinkTable())


def test_merge_takes_the_newer_measurement_per_entry():
    mine = LinkTable()
    mine.observe_rtt("a", "b", 0.001, now=100.0)  # age 10 at 110
    mine.observe_transfer("a", "b", MiB, 1.0, now=90.0)  # age 20 at 110
    theirs = LinkTable()
    theirs.observe_rtt("a", "b", 0.005, now=45.0)  # age 15 at their 60: older than mine
    theirs.observe_transfer("a", "b", 2 * MiB, 1.0, now=55.0)  # age 5: newer
    theirs.observe_rtt("c", "d", 0.002, now=58.0)  # unknown here: taken
    taken = mine.merge(theirs.share(now=60.0), now=110.0)
    assert taken == 2
    assert mine.rtt("a", "b", now=110.0).value == pytest.approx(0.001)
    bandwidth = mine.bandwidth("a", "b", now=110.0)
    assert bandwidth.value == pytest.approx(2 * MiB)
    assert bandwidth.age_s == pytest.approx(5.0)
    assert mine.rtt("c", "d", now=110.0).age_s == pytest.approx(2.0)


def test_merge_is_idempotent_and_keeps_own_newer_figures():
    table = LinkTable()
    table.observe_rtt("a", "b", 0.001, now=10.0)
    shared = table.share(now=10.0)
    assert table.merge(shared, now=10.0) == 0
    assert table.rtt("a", "b", now=10.0).value == pytest.approx(0.001)


@pytest.mark.parametrize(
    "shared",
    [
        {"latency": {}},
        {"rtt": {"ab": [0.1, 0.0, 1.0]}},
        {"rtt": {"a|b": [0.1, 0.0]}},
        {"rtt": {"a|b": [-0.1, 0.0, 1.0]}},
        {"rtt": {"a|b": [0.1, -5.0, 1.0]}},
        {"bandwidth": {"a|b": [math.nan, 0.0, 1.0]}},
    ],
)
def test_merge_refuses_malformed_tables(shared):
    with pytest.raises(ValueError):
        LinkTable().merge(shared, now=0.0)


@settings(max_examples=100, deadline=None)
@given(
    samples=st.lists(
        st.floats(min_value=1e-6, max_value=1e3, allow_nan=False), min_size=1, max_size=30
    ),
    alpha=st.floats(min_value=0.01, max_value=1.0),
)
def test_ewma_stays_within_the_range_of_its_samples(samples, alpha):
    table = LinkTable(alpha=alpha)
    for i, rtt in enumerate(samples):
        table.observe_rtt("a", "b", rtt, now=float(i))
    value = table.rtt("a", "b", now=float(len(samples))).value
    assert min(samples) * (1 - 1e-9) <= value <= max(samples) * (1 + 1e-9)


@settings(max_examples=100, deadline=None)
@given(
    ages=st.lists(
        st.tuples(st.sampled_from(["a|b", "b|a", "a|c"]), st.floats(0, 100), st.floats(0, 100)),
        max_size=10,
    )
)
def test_merge_result_holds_the_newest_of_both_tables(ages):
    """Whatever the order of measurements, after a merge each entry is the newer one."""
    mine, theirs = LinkTable(max_age_s=1e9), LinkTable(max_age_s=1e9)
    now = 200.0
    for key, age_mine, age_theirs in ages:
        src, _, dst = key.partition("|")
        mine.observe_rtt(src, dst, age_mine / 1000, now=now - age_mine)
        theirs.observe_rtt(src, dst, age_theirs / 1000 + 1, now=now - age_theirs)
    before_mine = {(r.src, r.dst): r for r in mine.readings(now)}
    before_theirs = {(r.src, r.dst): r for r in theirs.readings(now)}
    mine.merge(theirs.share(now), now)
    for link, row in {(r.src, r.dst): r for r in mine.readings(now)}.items():
        candidates = [t[link] for t in (before_mine, before_theirs) if link in t]
        newest = min(candidates, key=lambda r: r.age_s)
        assert row.age_s == pytest.approx(newest.age_s)
