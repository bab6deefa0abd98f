"""The verdict of a local run: what went wrong although every step completed."""

from __future__ import annotations

import pytest
from chaos_cli.local.churn import ChurnEvent
from chaos_cli.local.verdict import problems

pytestmark = pytest.mark.unit

WORKERS = ["w0", "w1", "w2"]


def _change(step: int, removed: list[str], added: list[str], causes: list[str]) -> dict:
    members = sorted(set(WORKERS) - set(removed) | set(added))
    return {"epoch": 1, "step": step, "added": added, "removed": removed, "members": members,
            "causes": causes}  # fmt: skip


def _verdict(*, changes=(), fired=(), rejoining=(), digests=None, completed=10) -> list[str]:
    return problems(
        steps=10,
        completed=completed,
        digests=digests or {w: "a" * 64 for w in WORKERS},
        finishers=WORKERS,
        members=WORKERS,
        started=WORKERS,
        rejoining=rejoining,
        fired=list(fired),
        changes=list(changes),
    )


def test_a_clean_run_has_no_problems():
    assert _verdict() == []


def test_missing_steps_and_different_states_are_named():
    found = _verdict(completed=7, digests={"w0": "a" * 64, "w1": "b" * 64, "w2": "a" * 64})
    assert found[0] == "only 7 of 10 steps completed"
    assert "different training states" in found[1]


def test_a_removal_no_event_explains_is_a_problem():
    found = _verdict(changes=[_change(4, ["w2"], [], ["crash:w2"])])
    assert found == [
        "w2 was removed at step 4 (crash:w2) by no injected event and did not come back"
    ]


def test_a_removal_that_came_back_is_not_a_problem():
    changes = [_change(4, ["w2"], [], ["crash:w2"]), _change(6, [], ["w2"], ["join:w2"])]
    assert _verdict(changes=changes) == []


def test_a_paused_worker_still_rejoining_at_the_end_is_explained():
    changes = [_change(8, ["w2"], [], ["crash:w2"])]
    fired = [ChurnEvent("pause", 7, "w2")]
    assert _verdict(changes=changes, fired=fired, rejoining=["w2"]) == []


def test_a_paused_worker_that_stopped_asking_to_rejoin_is_a_problem():
    changes = [_change(8, ["w2"], [], ["crash:w2"])]
    fired = [ChurnEvent("pause", 7, "w2")]
    assert len(_verdict(changes=changes, fired=fired, rejoining=[])) == 1


def test_rejoining_explains_only_a_worker_the_run_paused():
    changes = [_change(8, ["w2"], [], ["crash:w2"])]
    assert len(_verdict(changes=changes, rejoining=["w2"])) == 1
