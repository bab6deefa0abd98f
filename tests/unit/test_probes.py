"""Active probes: the round schedule (edge colouring) and the member-side monitor."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
from chaos_worker.telemetry.linktable import MIN_TRANSFER_BYTES, LinkTable
from chaos_worker.telemetry.probes import (
    PROBE_BYTES,
    LinkMonitor,
    Probe,
    directed,
    schedule_probes,
)
from hypothesis import given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.unit

MiB = 1 << 20


def members(n: int) -> list[str]:
    return [f"w{i}" for i in range(n)]


@st.composite
def link_sets(draw) -> list[tuple[str, str]]:
    """Random directed links without loops (duplicates allowed) over up to 9 members."""
    n = draw(st.integers(2, 9))
    pairs = [(a, b) for a, b in itertools.permutations(members(n), 2)]
    return draw(st.lists(st.sampled_from(pairs), max_size=40))


@settings(max_examples=300, deadline=None)
@given(
    links=link_sets(),
    per_round=st.integers(1, 6),
    probe_bytes=st.sampled_from([MIN_TRANSFER_BYTES, PROBE_BYTES, MiB]),
)
def test_every_link_is_probed_exactly_once_and_no_member_twice_per_round(
    links, per_round, probe_bytes
):
    budget = per_round * probe_bytes + probe_bytes // 2
    rounds = schedule_probes(links, probe_bytes=probe_bytes, round_budget_bytes=budget)
    probed = Counter((p.src, p.dst) for r in rounds for p in r)
    assert set(probed) == set(links)
    assert all(count == 1 for count in probed.values())
    for this_round in rounds:
        assert this_round, "no empty rounds"
        ends = [m for p in this_round for m in (p.src, p.dst)]
        assert len(ends) == len(set(ends)), f"a member is in two probes: {this_round}"
        assert sum(p.nbytes for p in this_round) <= budget
        assert all(p.nbytes == probe_bytes for p in this_round)


@settings(max_examples=100, deadline=None)
@given(links=link_sets(), seed=st.randoms())
def test_the_schedule_does_not_depend_on_the_order_of_the_links(links, seed):
    shuffled = list(links)
    seed.shuffle(shuffled)
    assert schedule_probes(links) == schedule_probes(shuffled)


@settings(max_examples=100, deadline=None)
@given(n=st.integers(2, 8))
def test_full_mesh_needs_few_rounds(n):
    """Greedy matching is within a factor two of the optimum (max degree rounds)."""
    links = list(itertools.permutations(members(n), 2))
    rounds = schedule_probes(links, round_budget_bytes=1 << 40)
    max_degree = 2 * (n - 1)  # each member is in n-1 outgoing and n-1 incoming links
    assert max_degree <= len(rounds) <= 2 * max_degree - 1


def test_budget_limits_probes_per_round():
    links = [("a", "b"), ("c", "d"), ("e", "f")]
    rounds = schedule_probes(links, probe_bytes=PROBE_BYTES, round_budget_bytes=2 * PROBE_BYTES)
    assert [len(r) for r in rounds] == [2, 1]


def test_no_links_no_rounds():
    assert schedule_probes([]) == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"links": [("a", "a")]},
        {"links": [("a", "b")], "probe_bytes": MIN_TRANSFER_BYTES - 1},
        {"links": [("a", "b")], "probe_bytes": MiB, "round_budget_bytes": MiB - 1},
    ],
)
def test_bad_schedules_are_refused(kwargs):
    with pytest.raises(ValueError):
        schedule_probes(**kwargs)


def test_directed_gives_both_directions_of_live_links():
    overlay = ["a|b", "a|c", "b|c"]
    assert directed(overlay, down=["a|c"]) == [("a", "b"), ("b", "a"), ("b", "c"), ("c", "b")]
    assert directed(overlay, members=["a", "b"]) == [("a", "b"), ("b", "a")]


# ---------------------------------------------------------------- LinkMonitor


def test_plain_pong_is_an_rtt_sample():
    monitor = LinkMonitor("w0")
    monitor.on_pong("w1", echo=10.0, now=10.004)
    assert monitor.table.rtt("w0", "w1", now=10.004).value == pytest.approx(0.004)
    assert monitor.table.bandwidth("w0", "w1", now=10.004) is None


def test_probe_answer_is_a_bandwidth_sample_net_of_the_base_rtt():
    monitor = LinkMonitor("w0")
    monitor.on_pong("w1", echo=0.0, now=0.002)  # base RTT 2 ms
    probe = Probe("w0", "w1", MiB)
    sent_at = monitor.start(probe, now=1.0)
    assert monitor.in_flight() == [probe]
    monitor.on_pong("w1", echo=sent_at, now=1.102)  # 100 ms of transfer
    assert monitor.in_flight() == []
    assert monitor.table.bandwidth_of("w0", "w1", now=1.2) == pytest.approx(MiB / 0.1)
    assert monitor.table.rtt("w0", "w1", now=1.2).samples == 1, "a probe is no RTT sample"


def test_probe_estimate_never_exceeds_twice_bytes_over_round_trip():
    monitor = LinkMonitor("w0")
    monitor.on_pong("w1", echo=0.0, now=0.050)  # jittery base RTT above the probe's
    sent_at = monitor.start(Probe("w0", "w1", MiB), now=1.0)
    monitor.on_pong("w1", echo=sent_at, now=1.010)
    assert monitor.table.bandwidth_of("w0", "w1", now=1.1) == pytest.approx(MiB / 0.005)


def test_pair_gap_is_the_transfer_time_whatever_the_round_trip():
    """80 ms of round trip around 100 ms of transfer: the gap between the two Pongs."""
    monitor = LinkMonitor("w0")
    probe = Probe("w0", "w1", MiB)
    marker, sent_at = monitor.start_pair(probe, now=1.0)
    assert marker < sent_at
    monitor.on_pong("w1", echo=marker, now=1.080)
    assert monitor.in_flight() == [probe], "the marker's answer ends nothing"
    monitor.on_pong("w1", echo=sent_at, now=1.180)
    assert monitor.in_flight() == []
    assert monitor.table.bandwidth_of("w0", "w1", now=1.2) == pytest.approx(MiB / 0.1)
    assert monitor.table.rtt("w0", "w1", now=1.2).value == pytest.approx(0.08)


def test_pair_uses_the_peers_own_gap_when_it_sends_one():
    """The marker's Pong was held up behind the peer's own traffic (it came back 1 ms
    before the probe's): the peer's read gap, not the arrival gap, is the transfer time."""
    monitor = LinkMonitor("w0")
    marker, sent_at = monitor.start_pair(Probe("w0", "w1", MiB), now=1.0)
    monitor.on_pong("w1", echo=marker, now=1.179)
    monitor.on_pong("w1", echo=sent_at, now=1.180, gap_s=0.1)
    assert monitor.table.bandwidth_of("w0", "w1", now=1.2) == pytest.approx(MiB / 0.1)


def test_pair_without_its_marker_answer_falls_back_to_the_base_rtt():
    monitor = LinkMonitor("w0")
    monitor.on_pong("w1", echo=0.0, now=0.080)  # base RTT 80 ms
    _, sent_at = monitor.start_pair(Probe("w0", "w1", MiB), now=1.0)
    monitor.on_pong("w1", echo=sent_at, now=1.180)
    assert monitor.table.bandwidth_of("w0", "w1", now=1.2) == pytest.approx(MiB / 0.1)


def test_probes_to_the_same_peer_at_the_same_instant_stay_apart():
    monitor = LinkMonitor("w0")
    first = monitor.start(Probe("w0", "w1", MiB), now=5.0)
    second = monitor.start(Probe("w0", "w1", 2 * MiB), now=5.0)
    assert first != second
    monitor.on_pong("w1", echo=second, now=6.0)
    assert monitor.in_flight() == [Probe("w0", "w1", MiB)]


def test_unanswered_probes_expire():
    monitor = LinkMonitor("w0", timeout_s=5.0, steps_per_round=1)
    links = [("w0", "w1"), ("w1", "w0")]
    (probe,) = monitor.due(links, step=0, now=0.0)
    monitor.start(probe, now=0.0)
    assert monitor.due(links, step=2, now=1.0) == []  # still in flight: no second probe
    assert monitor.due(links, step=2, now=6.0) == [probe]  # expired: probed again
    assert monitor.in_flight() == []


def test_fresh_links_are_not_probed():
    table = LinkTable()
    table.observe_transfer("w0", "w1", MiB, 0.01, now=0.0)
    monitor = LinkMonitor("w0", table, steps_per_round=1)
    links = [("w0", "w1"), ("w1", "w0")]
    due = [monitor.due(links, step=s, now=1.0) for s in range(2)]
    assert due == [[], []]


def test_rounds_start_only_at_round_boundaries():
    monitor = LinkMonitor("w0", steps_per_round=3)
    links = [("w0", "w1")]
    assert [len(monitor.due(links, step=s, now=0.0)) for s in range(4)] == [1, 0, 0, 1]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 7), steps_per_round=st.integers(1, 3), fresh=st.data())
def test_members_agree_on_rounds_and_cover_every_stale_link(n, steps_per_round, fresh):
    """Each member runs its own monitor; together they never put a member in two probes
    of one step, and within one pass over the rounds every stale link is probed once."""
    ids = members(n)
    overlay = [f"{a}|{b}" for a, b in itertools.combinations(ids, 2)]
    links = directed(overlay)
    fresh_links = fresh.draw(st.sets(st.sampled_from(links)))
    monitors = {}
    for me in ids:
        table = LinkTable()
        for src, dst in fresh_links:
            table.observe_transfer(src, dst, MiB, 0.01, now=0.0)
        monitors[me] = LinkMonitor(me, table, steps_per_round=steps_per_round)
    rounds = len(monitors["w0"].rounds(links))
    probed: Counter = Counter()
    for step in range(rounds * steps_per_round):
        started = [p for m in monitors.values() for p in m.due(links, step, now=1.0)]
        ends = [e for p in started for e in (p.src, p.dst)]
        assert len(ends) == len(set(ends))
        for probe in started:
            probed[(probe.src, probe.dst)] += 1
            sent_at = monitors[probe.src].start(probe, now=1.0)
            monitors[probe.src].on_pong(probe.dst, sent_at, now=1.01)
    assert set(probed) == set(links) - fresh_links
    assert all(count == 1 for count in probed.values())
