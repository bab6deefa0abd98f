"""Protocol faults that `chaos soak` found, each reduced to the one member that goes wrong
(the membership protocol with a fake clock, as in `test_membership_protocol.py`).

All three are fixed (`membership/planned.py`, `rules.moot`); the tests keep them fixed.
"""

from __future__ import annotations

import pytest
from chaos_worker.net.wire import MemberStatus, Proposal

from tests.unit.test_membership_protocol import (
    W3,
    W4,
    boundary,
    command,
    decision,
    event,
    install_pending,
    mesh,
    proposal,
    recovery,
    run_table,
    silent,
)

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


def _rejoined_then_cut(*, suspected: bool):
    """w1 is removed by the others' recovery (having first suspected w0 and w2 itself,
    when `suspected`), rejoins, and then w0 is cut off from w1 and w2. w1, the smallest
    id of its side {w1, w2}, coordinates that side's recovery; returns its membership."""
    without_w1 = mesh("w0", "w2").model_copy(update={"epoch": 1})
    back = W3.model_copy(update={"epoch": 2})

    def cut(subject: str, peer: str) -> Proposal:
        return Proposal(
            id=f"link_down:{subject}:{peer}",
            origin=subject,
            kind="link_down",
            subject=subject,
            peer=peer,
            detected_at=3.0,
            epoch=2,
        )

    def status(origin: str, completed: int) -> MemberStatus:
        return MemberStatus(
            id=f"status:{origin}:2:0", origin=origin, epoch=2, round=0, completed=completed
        )

    woke = [(1.0, silent("w0"), None), (1.0, silent("w2"), None)] if suspected else []
    h = run_table("w1", W3, [
        *woke,  # awake after 2.5 failure timeouts: it heard nobody
        (1.0, decision(without_w1, 5, immediate=True), None),  # the others' recovery
        (1.0, recovery(), None),
        (1.1, boundary(5), None),  # not in the view: paused, asks to come back
        (2.0, decision(back, 9), None),
        (2.1, install_pending(9), None),  # back in the job
        (3.0, command("link_down", "w0"), None),  # w0 is cut off (on the tree: abort)
        (3.0, event(lambda h: h.membership.on_proposal(cut("w2", "w0"), h.now)), None),
        (3.1, recovery(), None),
        (3.2, event(lambda h: h.membership.on_status(status("w2", 8), h.now)), None),
    ], step=5)  # fmt: skip
    return h.membership


def test_a_member_that_rejoined_coordinates_its_sides_recovery() -> None:
    membership = _rejoined_then_cut(suspected=False)
    assert sorted(membership.view.members) == ["w1", "w2"] and not membership.view.paused


def test_suspicions_a_member_made_before_it_was_removed_do_not_outlive_its_rejoin() -> None:
    """As above, but w1 woke from a pause longer than the failure timeout and suspected
    w0 and w2 before it heard that it had been removed: that old suspicion of w2 must not
    take w2 out of the view of the recovery w1 coordinates after its rejoin."""
    membership = _rejoined_then_cut(suspected=True)
    assert sorted(membership.view.members) == ["w1", "w2"] and not membership.view.paused
