"""The spare pool's bookkeeping (`chaos_cli.local.spares`): names, top-up, losses."""

from __future__ import annotations

import pytest
from chaos_cli.local.spares import SparePool

pytestmark = pytest.mark.unit


def start_all(pool: SparePool) -> list[str]:
    started = []
    while (name := pool.next_name()) is not None:
        pool.started(name)
        started.append(name)
    return started


def test_spares_take_the_joiners_names_in_schedule_order_then_fresh_ones() -> None:
    pool = SparePool.plan(3, ["w4", "w9"], ["w0", "w1", "w2", "w3"], fresh=True)
    assert start_all(pool) == ["w4", "w9", "w10"]


def test_without_fresh_names_the_pool_stops_at_the_schedule() -> None:
    pool = SparePool.plan(3, ["w4"], ["w0"], fresh=False)
    assert start_all(pool) == ["w4"]


def test_a_used_spare_is_replaced_only_once_it_has_joined() -> None:
    pool = SparePool.plan(1, ["w3", "w4"], ["w0", "w1", "w2"], fresh=True)
    assert start_all(pool) == ["w3"]
    assert pool.claim("w3")
    assert pool.next_name() is None  # its transfer needs the cores
    pool.joined("w3")
    assert start_all(pool) == ["w4"]
    assert pool.report() == {"pool": 1, "used": ["w3"], "lost": [], "unused": ["w4"]}


def test_a_join_without_a_waiting_spare_starts_cold_and_leaves_the_pool_its_name() -> None:
    pool = SparePool.plan(1, ["w3", "w4"], ["w0", "w1", "w2"], fresh=False)
    assert start_all(pool) == ["w3"]
    assert pool.claim("w3")
    assert not pool.claim("w4")  # w3 still joining: w4 was never started
    pool.joined("w3")
    assert start_all(pool) == []  # w4 is taken (cold), no fresh names
    assert pool.used == ["w3"]


def test_a_lost_spare_is_started_again_first_under_its_name() -> None:
    pool = SparePool.plan(2, ["w3"], ["w0", "w1", "w2"], fresh=True)
    assert start_all(pool) == ["w3", "w4"]
    pool.lose("w3")
    assert start_all(pool) == ["w3"]
    assert pool.lost == ["w3"]
    assert sorted(pool.waiting) == ["w3", "w4"]
