"""`chaos soak`'s random schedules: valid, reproducible, every kind of churn, a majority
always left."""

from __future__ import annotations

from collections import Counter

import pytest
from chaos_cli.local.churn import parse_churn
from chaos_cli.local.soakplan import (
    EPISODES,
    LATEST_PAUSE,
    MIN_STEPS,
    PlanError,
    draw_schedule,
    party_of,
)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("workers", [6, 9, 30])
@pytest.mark.parametrize("steps", [MIN_STEPS, 301, 400, 1000])
def test_every_schedule_parses_and_fits_in_the_round(workers: int, steps: int) -> None:
    for seed in range(3):
        for round_index in range(10):
            schedule = draw_schedule(seed, round_index, workers, steps)
            events = parse_churn(schedule.spec, workers)
            assert events == schedule.events
            assert all(0 < e.step < steps for e in events)


def test_the_same_seed_and_round_give_the_same_schedule() -> None:
    assert draw_schedule(7, 3, 6, 400).spec == draw_schedule(7, 3, 6, 400).spec
    specs = {draw_schedule(seed, r, 6, 400).spec for seed in range(3) for r in range(3)}
    assert len(specs) > 3  # seed + round: a few coincide (0+1 == 1+0), most differ


def test_every_round_has_every_episode_and_a_crash_or_a_hang() -> None:
    seen: Counter = Counter()
    for round_index in range(4):
        schedule = draw_schedule(0, round_index, 6, 400)
        loss = "crash" if round_index % 2 == 0 else "hang"
        assert dict(schedule.episodes) == {e: 1 for e in EPISODES if e != "loss"} | {loss: 1}
        seen.update(e.kind for e in schedule.events)
    assert set(seen) == {"join", "leave", "crash", "hang", "pause", "link-down", "link-up"}


def test_a_round_keeps_a_majority() -> None:
    """One worker lost for good, the leave balanced by the join, a partition cuts off a
    minority of the members, a pause comes early enough to rejoin."""
    for seed in range(20):
        schedule = draw_schedule(seed, 0, 6, 400)
        kinds = Counter(e.kind for e in schedule.events)
        assert kinds["crash"] + kinds["hang"] == 1
        assert kinds["join"] == kinds["leave"] == 1
        members = {f"w{i}" for i in range(6)}
        for event in schedule.events:
            if event.kind == "join":
                members.add(event.worker)
            elif event.kind in ("leave", "crash", "hang"):
                members.discard(event.worker)
            elif event.kind == "pause":
                assert event.step <= 400 * LATEST_PAUSE
        cut = _partition(schedule.events)
        assert cut, schedule.spec
        inside = {a for a, _ in cut}
        assert len({party_of(w) for w in inside}) == 1  # one party
        outside = {b for _, b in cut}
        assert len(inside) < len(outside)  # a minority of the members of that step
        assert {(a, b) for a in inside for b in outside} == set(cut)  # every link between


def _partition(events) -> list[tuple[str, str]]:
    """The links of the step at which most links go down at once."""
    downs = Counter(e.step for e in events if e.kind == "link-down")
    step, count = downs.most_common(1)[0]
    if count < 2:
        return []
    return [(e.worker, e.peer) for e in events if e.kind == "link-down" and e.step == step]


def test_too_few_steps_or_workers_are_refused() -> None:
    with pytest.raises(PlanError, match=f"at least {MIN_STEPS} steps"):
        draw_schedule(0, 0, 6, MIN_STEPS - 1)
    with pytest.raises(PlanError, match="at least 6 workers"):
        draw_schedule(0, 0, 5, 400)
