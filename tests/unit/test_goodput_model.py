"""`chaos bench goodput`'s pure parts: the churn schedule, the torchrun-style restart model,
and the rates and membership it reads from step stamps."""

from __future__ import annotations

import pytest
from chaos_cli.benches.goodput import (
    RestartParts,
    churn_schedule,
    matched_seconds,
    mean_members,
    members_at,
    samples_per_s,
    step_s_by_members,
    torchrun_seconds,
)
from chaos_cli.local.churn import parse_churn

pytestmark = pytest.mark.unit


def test_the_default_schedule_alternates_departures_and_joins() -> None:
    assert churn_schedule(2, 500, 100) == "leave:w1@100,join@200,crash:w2@300,join@400"
    assert churn_schedule(3, 700, 100) == (
        "leave:w2@100,join@200,crash:w3@300,join@400,leave:w4@500,join@600"
    )


@pytest.mark.parametrize("workers", [2, 3, 5])
@pytest.mark.parametrize(("steps", "every"), [(40, 10), (500, 100), (999, 100), (20, 10)])
def test_every_schedule_parses_keeps_w0_and_the_membership_within_one(
    workers: int, steps: int, every: int
) -> None:
    events = parse_churn(churn_schedule(workers, steps, every), workers)
    assert [e.step for e in events] == list(range(every, steps - every + 1, every))
    assert [e.kind for e in events][:4] == ["leave", "join", "crash", "join"][: len(events)]
    assert all(e.worker != "w0" for e in events)
    members = workers
    for event in events:
        members += 1 if event.kind == "join" else -1
        assert workers - 1 <= members <= workers


def test_each_departure_takes_the_last_joiner() -> None:
    events = parse_churn(churn_schedule(2, 1000, 100), 2)
    joined = [e.worker for e in events if e.kind == "join"]
    departed = [e.worker for e in events if e.kind != "join"]
    assert departed == ["w1", *joined[: len(departed) - 1]]


def test_a_schedule_needs_a_member_left_behind() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        churn_schedule(1, 500, 100)
    assert churn_schedule(2, 199, 100) == ""  # no event has a full interval after it


PARTS = RestartParts(start_s=3.0, rendezvous_s=0.5, save_s=0.2, load_s=0.3)


def test_without_events_torchrun_pays_only_its_checkpoints() -> None:
    run = torchrun_seconds(steps=400, step_s=0.1, events=0, checkpoint_every=50, parts=PARTS)
    assert run == pytest.approx(400 * 0.1 + 8 * 0.2)


def test_each_event_costs_a_restart_and_half_an_interval_redone() -> None:
    def seconds(events: int) -> float:
        return torchrun_seconds(
            steps=400, step_s=0.1, events=events, checkpoint_every=50, parts=PARTS
        )

    assert PARTS.restart_s == pytest.approx(0.3 + 3.0 + 0.5)
    assert seconds(1) - seconds(0) == pytest.approx(3.8 + 25 * 0.1)
    assert seconds(4) - seconds(0) == pytest.approx(4 * (3.8 + 2.5))


def test_rates_count_the_steps_after_the_warm_up() -> None:
    times = {step: 10.0 + 0.5 * step for step in range(12)}
    assert samples_per_s(times, 2, 64) == pytest.approx((9 * 64 / 4.5, 9, 4.5))
    # a step nobody reported still counts: samples are completed steps times the batch
    del times[5]
    assert samples_per_s(times, 2, 64) == pytest.approx((9 * 64 / 4.5, 9, 4.5))
    with pytest.raises(ValueError, match="too few"):
        samples_per_s({0: 1.0, 1: 2.0}, 1, 64)


def test_mean_members_holds_each_count_until_the_next_point() -> None:
    curve = [(0, 2), (10, 1), (15, 2)]
    assert mean_members(curve, 0, 20) == pytest.approx((10 * 2 + 5 * 1 + 5 * 2) / 20)
    assert mean_members(curve, 10, 15) == 1
    assert mean_members([(5, 3)], 0, 10) == 3  # before the first point: its count


def test_members_at_reads_the_count_in_force_at_each_step() -> None:
    assert members_at([(3, 2), (6, 1)], [0, 3, 5, 6, 9]) == [2, 2, 2, 1, 1]
    with pytest.raises(ValueError):
        members_at([], [0])


def test_step_times_by_members_split_the_gaps_by_who_trained_them() -> None:
    times = {0: 0.0, 1: 1.0, 2: 2.0, 3: 2.5, 4: 3.0, 6: 4.0}
    curve = [(0, 1), (3, 2)]
    # gaps 1-2 and 0-1 (1 s) by one member; 2-3, 3-4 and 4-6 (0.5 s a step) by two
    assert step_s_by_members(times, curve, 0) == {1: 1.0, 2: 0.5}
    assert step_s_by_members(times, curve, 2) == {2: 0.5}


def test_matched_seconds_price_each_step_at_its_member_count() -> None:
    curve = [(0, 2), (20, 1), (40, 2)]  # a leave at 20, a join at 40
    pace = {2: 0.1, 1: 0.3}
    # steps 11..50: 9 with two members, 20 with one, 11 with two again
    assert matched_seconds(curve, 10, 50, pace) == pytest.approx(20 * 0.1 + 20 * 0.3)
    assert matched_seconds([(0, 2)], 10, 50, pace) == pytest.approx(40 * 0.1)


def test_matched_seconds_need_a_pace_for_every_member_count() -> None:
    with pytest.raises(ValueError, match=r"no DDP pace for \[3\] ranks"):
        matched_seconds([(0, 2), (5, 3)], 0, 10, {2: 0.1})
