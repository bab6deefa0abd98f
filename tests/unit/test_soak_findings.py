"""Protocol faults that `chaos soak` found, each reduced to the one member that goes wrong
(the membership protocol with a fake clock, as in `test_membership_protocol.py`).

Both are fixed (`membership/planned.py`, `rules.moot`); the tests keep them fixed.
"""

from __future__ import annotations

import pytest

from tests.unit.test_membership_protocol import W4, boundary, decision, proposal, run_table

pytestmark = pytest.mark.unit


def test_a_planned_decision_does_not_replace_one_that_is_not_installed_yet() -> None:
    """The root installs epoch 1 at step 53 and at once decides epoch 2 for step 54 (the
    totals of 53 have not left it: one step of margin). A member behind a slow link is
    still finishing step 52 when epoch 2 reaches it, flooded over a faster path. It must
    still train step 53 in epoch 1, as the root does."""
    first = W4.model_copy(
        update={"epoch": 1, "speeds": {"w0": 2.0, "w1": 1.0, "w2": 1.0, "w3": 1.0}}
    )
    second = W4.model_copy(update={"epoch": 2})
    h = run_table("w2", W4, [
        (1.0, decision(first, 53), None),
        (1.1, decision(second, 54), None),  # before w2 reached step 53
        (1.2, boundary(53), None),
    ], step=52)  # fmt: skip
    assert h.membership.view.epoch == 1


def test_the_other_ends_link_down_does_not_cut_a_healed_link_again() -> None:
    """Both ends of a cut link propose `link_down`; the root decides the first, and the
    second arrives while that decision is pending. After the link came back (`link_up`
    decided and installed), the second end's old proposal must not put it down again."""
    h = run_table("w0", W4, [
        (1.0, proposal("link_down", "w1", "w2"), None),  # off the tree (a star around w0)
        (1.05, proposal("link_down", "w2", "w1"), None),  # the other end's, once decided
        (1.1, boundary(6), None),  # link down in force
        (1.3, proposal("link_up", "w1", "w2"), None),
        (1.4, boundary(7), None),  # link up in force
    ])  # fmt: skip
    assert h.membership.view.down == []
    pending = h.membership.pending
    assert pending is None or pending.view.down == [], "the healed link goes down again"
