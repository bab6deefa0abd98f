"""Sample accounting: every sample of every step computed by exactly one member."""

from __future__ import annotations

import pytest
from chaos_cli.local.accounting import account

pytestmark = pytest.mark.unit

G = 12
FOUR = ["w0", "w1", "w2", "w3"]


def progress(worker: str, step: int, piece: tuple[int, int] | None, **extra) -> dict:
    """A progress record as the trainer sends it (only the keys the accounting reads)."""
    return {
        "kind": "progress",
        "worker": worker,
        "step": step,
        "slice": None if piece is None else list(piece),
        "epoch": 0,
        "members": 4,
    } | extra


def even(step: int, workers: list[str] = FOUR, **extra) -> list[dict]:
    """Every worker reports its equal share of `step`."""
    share = G // len(workers)
    return [
        progress(w, step, (i * share, share), members=len(workers), **extra)
        for i, w in enumerate(sorted(workers))
    ]


def test_a_clean_run_accounts_for_every_sample() -> None:
    found = account([r for s in range(5) for r in even(s)], G, FOUR)
    assert found.problems == []
    assert (found.steps, found.samples, found.inferred) == (5, 5 * G, 0)


def test_a_gap_is_named() -> None:
    records = even(0)
    records[2] = progress("w2", 0, (7, 2))  # w2 should have started at 6: sample 6 is lost
    assert account(records, G, FOUR).problems == ["step 0: samples [6, 7) were not computed"]
    short = [*even(1)[:3], progress("w3", 1, (9, 2))]
    assert account(short, G, FOUR).problems == ["step 1: samples [11, 12) were not computed"]


def test_an_overlap_is_named() -> None:
    records = even(3)
    records[1] = progress("w1", 3, (2, 4))  # [2, 3) again, and w2 takes over from 6
    assert account(records, G, FOUR).problems == [
        "step 3: samples [2, 3) of w1 were computed twice (an overlap)"
    ]
    past = [*even(4)[:3], progress("w3", 4, (9, 4))]
    assert account(past, G, FOUR).problems == ["step 4: slices reach sample 13, past G = 12"]


def test_a_duplicated_step_is_named() -> None:
    records = [*even(7), progress("w2", 7, (6, 3))]
    assert account(records, G, FOUR).problems == [
        "step 7: w2 reported it 2 times (a duplicated step)"
    ]


def test_a_step_computed_in_two_epochs_is_named() -> None:
    again = [progress("w0", 2, (0, 6), epoch=1, members=2), progress("w1", 2, (6, 6), epoch=1)]
    problems = account(even(2) + again, G, FOUR).problems
    assert "step 2: computed in epochs [0, 1] (a duplicated step)" in problems


def test_a_lagging_member_replaying_the_total_leaves_its_slice_inferred() -> None:
    records = even(5)
    records[1] = progress("w1", 5, None)  # it applied the replayed total of its attempt
    found = account(records, G, FOUR)
    assert found.problems == []
    assert (found.samples, found.inferred) == (G - 3, 3)


def test_a_member_that_died_after_contributing_leaves_its_slice_inferred() -> None:
    agreed = {
        "kind": "agreed",
        "decision": "d1",
        "epoch": 1,
        "members": ["w0", "w1", "w2"],
        "paused": False,
    }
    installed = {"kind": "installed", "decision": "d1", "epoch": 1}
    three = [progress(w, 9, (4 * i, 4), epoch=1, members=3) for i, w in enumerate(["w0", "w1"])]
    found = account([agreed, installed, *three], G, FOUR)
    assert found.problems == []  # w2 computed [8, 12) and crashed before it reported
    assert (found.samples, found.inferred) == (8, 4)
    # without a view that holds such a member, the same gap is a lost sample
    assert account(three, G, FOUR).problems == ["step 9: samples [8, 12) were not computed"]


def test_a_gap_only_counts_as_inferred_where_an_unreported_member_sits() -> None:
    records = even(6)
    records[3] = progress("w3", 6, None)  # the unknown slice is the last one
    records[1] = progress("w1", 6, (3, 2))  # but [5, 6) before w2 has nobody
    assert account(records, G, FOUR).problems == ["step 6: samples [5, 6) were not computed"]


def test_the_view_of_a_replaced_planned_decision_is_not_used() -> None:
    planned = {"kind": "agreed", "decision": "p", "epoch": 1, "members": FOUR, "paused": False}
    recovery = {
        "kind": "agreed",
        "decision": "r",
        "epoch": 1,
        "members": ["w0", "w1", "w2"],
        "paused": False,
    }
    installed = {"kind": "installed", "decision": "r", "epoch": 1}
    records = [planned, recovery, installed] + [
        progress(w, 4, (4 * i, 4), epoch=1, members=3) for i, w in enumerate(["w0", "w1"])
    ]
    found = account(records, G, FOUR)
    assert found.problems == [] and found.inferred == 4  # w2's place, from the recovery view


def test_ids_sort_as_strings_like_the_trainer() -> None:
    names = ["w10", "w2", "w9"]  # sorted: w10, w2, w9
    records = [
        progress("w10", 0, (0, 4), members=3),
        progress("w2", 0, (4, 4), members=3),
        progress("w9", 0, (8, 4), members=3),
    ]
    assert account(records, G, names).problems == []


def test_a_step_only_a_partitions_minority_applied_is_orphaned_not_duplicated() -> None:
    """The cut comes while the total of step 98 travels down: w0 and w3 (one party) got it
    and applied it, then paused as the minority; w1 and w2 did not, and redid step 98 in
    their recovery view. The job's step 98 is the redo."""
    redo = {"kind": "agreed", "decision": "r", "epoch": 1, "members": ["w1", "w2"]}
    minority = [
        {"kind": "installed", "worker": w, "decision": "m", "epoch": 1, "step": 99, "paused": True}
        for w in ("w0", "w3")
    ]
    records = [
        progress("w0", 98, (0, 3)),
        progress("w3", 98, (9, 3)),  # w1 and w2 computed [3, 9) but never got the total
        redo,
        {"kind": "installed", "decision": "r", "epoch": 1, "step": 98, "paused": False},
        progress("w1", 98, (0, 6), epoch=1, members=2),
        progress("w2", 98, (6, 6), epoch=1, members=2),
        *minority,
    ]
    found = account(records, G, FOUR)
    assert found.problems == []
    assert (found.samples, found.inferred, found.orphaned) == (G, 0, 6)
    # without the minority's pause, the two attempts are a step computed twice
    problems = account(records[:-2], G, FOUR).problems
    assert problems[0] == "step 98: computed in epochs [0, 1] (a duplicated step)"


def test_a_step_only_a_removed_root_applied_is_orphaned_not_duplicated() -> None:
    """`chaos soak` found it: the root w0 applied step 50 and was paused (SIGSTOP) before
    the total left it; the others removed it and redid step 50 without it. On waking, w0
    installs that view (which leaves it out) at step 51 and rejoins by copy."""
    redo = {"kind": "agreed", "decision": "r", "epoch": 1, "members": ["w1", "w2", "w3"]}
    records = [
        progress("w0", 50, (0, 3)),
        redo,
        *(
            {"kind": "installed", "worker": w, "decision": "r", "epoch": 1, "step": 50}
            for w in ("w1", "w2", "w3")
        ),
        progress("w1", 50, (0, 4), epoch=1, members=3),
        progress("w2", 50, (4, 4), epoch=1, members=3),
        progress("w3", 50, (8, 4), epoch=1, members=3),
        {"kind": "installed", "worker": "w0", "decision": "r", "epoch": 1, "step": 51},
    ]
    found = account(records, G, FOUR)
    assert found.problems == []
    assert (found.samples, found.orphaned) == (G, 3)
    # had w0 gone on training in the view of epoch 1, its step 50 would count twice
    problems = account(records[:-1], G, FOUR).problems
    assert problems[0] == "step 50: computed in epochs [0, 1] (a duplicated step)"
