"""The netns testbed's pure parts: names, addresses and tc commands; stale-run detection;
link profiles; the report's links matrix."""

from __future__ import annotations

import ipaddress

import pytest
from chaos_cli.local.netns import (
    NetnsError,
    missing_capabilities,
    plan_testbed,
    stale_namespaces,
)
from chaos_cli.local.profiles import load, names, resolve_links
from chaos_cli.local.report import links_matrix
from chaos_worker.net.shaping import LinkShape, ShapeError, delays_only, parse_links

pytestmark = pytest.mark.unit

TAG = "chaos-42-1000"


def test_plan_names_addresses_and_one_htb_class_per_shaped_destination() -> None:
    shapes = parse_links("w0-w1=20MB/s+10ms,w0-w2=+5ms")
    plan = plan_testbed(TAG, ["w0", "w1", "w2"], shapes, {"w2": 1e6})
    assert plan.hub == "chaos-42-1000-hub"
    assert plan.namespaces == {w: f"chaos-42-1000-{w}" for w in ("w0", "w1", "w2")}
    assert plan.addresses == {"w0": "198.18.0.1", "w1": "198.18.0.2", "w2": "198.18.0.3"}
    assert all(
        ipaddress.ip_address(a) in ipaddress.ip_network("198.18.0.0/15")
        for a in plan.addresses.values()
    )
    assert plan.rates == {("w0", "w1"): 20e6, ("w1", "w0"): 20e6}  # w0-w2 has a delay only
    lines = [" ".join(c) for c in plan.commands]
    # nothing runs in the root namespace: every link/addr/qdisc command names one
    assert all(
        line.startswith(("ip netns add", "ip -n chaos-42-1000-", "tc -n chaos-42-1000-"))
        for line in lines
    )
    assert lines[0] == "ip netns add chaos-42-1000-hub"
    w0 = [line for line in lines if line.startswith("tc -n chaos-42-1000-w0 ")]
    assert w0 == [
        "tc -n chaos-42-1000-w0 qdisc add dev eth0 root handle 1: htb default 0",
        "tc -n chaos-42-1000-w0 class add dev eth0 parent 1: classid 1:2 htb rate 160000000bit "
        "ceil 160000000bit quantum 65536",
        "tc -n chaos-42-1000-w0 filter add dev eth0 parent 1: protocol ip prio 1 u32 match ip "
        "dst 198.18.0.2/32 flowid 1:2",
    ]
    assert not any(line.startswith("tc -n chaos-42-1000-w2 ") for line in lines)  # unshaped
    tbf = "qdisc add dev v2 root tbf rate 8000000bit burst 262144 latency 200ms"
    assert f"tc -n chaos-42-1000-hub {tbf}" in lines


def test_class_ids_are_hex() -> None:
    workers = [f"w{i}" for i in range(12)]
    plan = plan_testbed(TAG, workers, parse_links("*=10MB/s"))
    w0 = [c for c in plan.commands if c[:3] == ["tc", "-n", "chaos-42-1000-w0"] and "class" in c]
    assert [c[c.index("classid") + 1] for c in w0] == [f"1:{j:x}" for j in range(2, 13)]


def test_too_many_workers_for_the_range() -> None:
    with pytest.raises(NetnsError):
        plan_testbed(TAG, [f"w{i}" for i in range(1 << 17)], {})


def test_stale_namespaces_are_those_whose_launcher_is_gone_or_reused() -> None:
    starts = {42: "1000", 43: "9999"}  # pid 43 was reused by a later process
    names_ = [
        "chaos-42-1000-hub",
        "chaos-42-1000-w0",
        "chaos-43-1000-w1",
        "chaos-44-5-hub",
        "other",
    ]
    assert stale_namespaces(names_, starts.get) == ["chaos-43-1000-w1", "chaos-44-5-hub"]


def test_delays_only_keeps_delays_and_drops_rates() -> None:
    shapes = parse_links("w0-w1=20MB/s+10ms,*=5MB/s")
    assert delays_only(shapes) == {"w0|w1": LinkShape(None, 0.01), "*": LinkShape(None, 0.0)}


def test_three_party_profile_assigns_workers_round_robin() -> None:
    assert "three-party" in names()
    profile = load("three-party")
    workers = ["w0", "w1", "w2", "w3", "w9"]
    assert profile.party_of(workers) == {"w0": "a", "w1": "b", "w2": "c", "w3": "a", "w9": "b"}
    shapes = parse_links(resolve_links("@three-party", workers))
    assert len(shapes) == 10  # every pair named
    assert shapes["w0|w3"] == LinkShape(200e6, 0.0)  # same party
    assert shapes["w1|w9"] == LinkShape(200e6, 0.0)
    inter = [s for k, s in shapes.items() if k not in ("w0|w3", "w1|w9")]
    assert all(10e6 <= s.rate_bytes_per_s <= 50e6 for s in inter)
    assert all(0.020 <= 2 * s.delay_s <= 0.080 for s in inter)  # RTT 20-80 ms


def test_links_other_than_profiles_pass_through_and_unknown_profiles_fail() -> None:
    assert resolve_links("w0-w1=1MB/s", ["w0", "w1"]) == "w0-w1=1MB/s"
    with pytest.raises(ShapeError, match="no profile @nope"):
        resolve_links("@nope", ["w0"])


def test_links_matrix_from_final_records() -> None:
    exits = {
        "w0": {
            "w0|w1": {
                "bandwidth": {"value": 9e6, "age_s": 1.0, "stale": False},
                "rtt": {"value": 0.03, "age_s": 0.1, "stale": False},
            }
        },
        "w1": {},
    }
    rows = links_matrix(exits, parse_links("w0-w1=10MB/s+10ms"))
    assert [(r.src, r.dst) for r in rows] == [("w0", "w1"), ("w1", "w0")]
    first, second = rows
    assert (first.shaped_bytes_per_s, first.added_rtt_s) == (10e6, 0.02)
    assert (first.bandwidth_bytes_per_s, first.rtt_s, first.bandwidth_age_s) == (9e6, 0.03, 1.0)
    assert second.bandwidth_bytes_per_s is None and second.rtt_s is None


def test_an_unknown_profile_is_one_line_and_exit_code_2(capsys) -> None:
    from chaos_cli.main import main

    assert main(["run", "--links", "@nope", "--churn", "none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["chaos run: error: --links: no profile @nope; bundled: three-party"]


def test_missing_capabilities_from_proc_status() -> None:
    full = "Name:\tpython\nCapEff:\t000001ffffffffff\n"
    assert missing_capabilities(full) == []
    no_sys_admin = f"CapEff:\t{0x1FFFFFFFFFF & ~(1 << 21):016x}\n"
    assert missing_capabilities(no_sys_admin) == ["CAP_SYS_ADMIN"]
    assert missing_capabilities("CapEff:\t0000000000000000\n") == ["CAP_NET_ADMIN", "CAP_SYS_ADMIN"]
