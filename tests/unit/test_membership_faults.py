"""The membership protocol under faults that are not clean crashes: stale and false
suspicions, concurrent recoveries, members removed while alive, scale to zero.

Same tables as `test_membership_protocol.py`: each row is `(now, event, out)`, and `out` is
everything the member under test does in response, in order.
"""

from __future__ import annotations

import itertools

import pytest
from chaos_worker.membership.protocol import RECOVERY_PATIENCE
from chaos_worker.membership.rules import fenced, preferred
from chaos_worker.membership.view import Change, next_view
from chaos_worker.net.wire import Decision, Proposal

from tests.unit.test_membership_protocol import (
    FAILURE_TIMEOUT_S,
    STAR3,
    W3,
    W4,
    Harness,
    boundary,
    command,
    decision,
    describe,
    event,
    mesh,
    proposal,
    recovery,
    render,
    run_table,
    silent,
    status,
)

pytestmark = pytest.mark.unit

E1 = W3.model_copy(update={"epoch": 1})
"""w0, w1, w2 in epoch 1: proposals made in epoch 0 are stale."""


def crash(subject: str, origin: str, *, epoch: int = 0, confirmed: bool = False) -> Proposal:
    return Proposal(
        id=f"crash:{subject}:{epoch}:{origin}" + ("!" if confirmed else ""),
        origin=origin,
        kind="crash",
        subject=subject,
        detected_at=0.0,
        epoch=epoch,
        confirmed=confirmed,
    )


def arrives(message: Proposal | Decision):
    """`message` flooded to the member under test."""

    def take(h: Harness) -> None:
        if isinstance(message, Proposal):
            h.membership.on_proposal(message, h.now)
        else:
            h.membership.on_decision(message, h.now)

    take.__name__ = f"arrives {render(message)}"
    return event(take)


def recovered(view, origin: str, step: int) -> Decision:
    return Decision(
        id=f"{origin}-{view.epoch}", origin=origin, view=view, effective_step=step, immediate=True
    )


# ---------------------------------------------------------------------- fencing


@pytest.mark.parametrize(
    "message, why",
    [
        (crash("w2", "w1", epoch=0), "made in epoch 0, before epoch 1"),
        (crash("w2", "w7", epoch=1), "w7 is not a member of epoch 1"),
        (
            Proposal(id="x", origin="w1", kind="leave", subject="w2", detected_at=0.0, epoch=1),
            "w1 speaks for w2",
        ),
    ],
)
def test_a_stale_or_foreign_proposal_changes_nothing(message: Proposal, why: str) -> None:
    assert fenced(E1, set(), message) == why
    h = run_table("w0", E1, [(1.0, arrives(message), [])])  # not acted on, not forwarded
    assert not h.membership.aborting and h.membership.view.epoch == 1


def test_the_suspicions_of_a_suspect_change_nothing() -> None:
    # w1 was paused: w0 suspects it; w1 wakes and floods its own (false) suspicions
    h = run_table("w0", W3, [
        (2.0, silent("w1"), ["report detected crash w1", "flood crash w1", "hear abort"]),
        (2.5, arrives(crash("w2", "w1")), []),
    ])  # fmt: skip
    assert h.membership.suspects == {"w1"}


def test_a_suspicion_of_a_member_heard_lately_is_refused_and_a_confirmed_one_is_not() -> None:
    async def refused(h: Harness) -> None:
        h.membership.silence = lambda member, now: 0.1  # heard from everybody 0.1 s ago
        h.membership.on_proposal(crash("w2", "w1"), h.now)

    h = run_table("w0", W3, [
        (2.0, refused, []),
        (2.1, arrives(crash("w2", "w1", confirmed=True)), [
            "flood crash w2", "hear abort",
        ]),
    ])  # fmt: skip
    assert h.membership.suspects == {"w2"} and h.membership.confirmed == {"w2"}


# ---------------------------------------------------------------------- concurrent decisions


def test_concurrent_recovery_decisions_resolve_the_same_way_in_any_order() -> None:
    # w0 decided without w1 (a majority); w1, cut off, decided a paused view of its own
    ours = recovered(mesh("w0", "w2", "w3").model_copy(update={"epoch": 1}), "w0", 5)
    lonely = next_view(W4, [Change("suspect", m) for m in ("w0", "w2", "w3")], side_of="w1")
    theirs = recovered(lonely.view, "w1", 5)
    assert theirs.view.paused
    for first, second in itertools.permutations([ours, theirs]):
        assert preferred(preferred(None, first), second) is ours
    twin = ours.model_copy(update={"id": "w0-1b", "origin": "w2"})
    assert preferred(twin, ours) is ours and preferred(ours, twin) is ours  # by coordinator
    for order in itertools.permutations([ours, theirs]):
        h = run_table("w2", W4, [
            (2.0, silent("w1"), ["report detected crash w1", "flood crash w1", "hear abort"]),
            *[(2.1, arrives(d), None) for d in order],
            (2.2, recovery(), None),
        ])  # fmt: skip
        assert describe(h.membership.view) == describe(ours.view)


def test_a_member_that_hears_it_was_removed_stops_at_once_and_asks_back() -> None:
    removed = recovered(mesh("w0", "w2").model_copy(update={"epoch": 1}), "w0", 5)
    h = run_table("w1", W3, [
        (2.5, arrives(removed), [  # not a neighbour of anybody in it: no links to open
            "flood decision e1 w0,w2 root=w0 tree=w2:w0 T=5",
            "report agreed 1 5",
            "hear abort",  # no more contributions to the step in flight
        ]),
        (2.5, recovery(), [
            "flood status w1 done=4",
            "hear installed", "trainer redoes", "report installed 1 5 False",
        ]),
        (2.6, boundary(5), [
            "trainer waits", "report evicted", "hear installed", "hear rejoin",
        ]),
    ])  # fmt: skip
    assert h.membership.view.paused and "w1" not in h.membership.view.members


def test_a_member_no_recovery_decision_reaches_takes_itself_out() -> None:
    patience = RECOVERY_PATIENCE * FAILURE_TIMEOUT_S
    h = run_table("w2", W3, [
        (2.0, silent("w1"), ["report detected crash w1", "flood crash w1", "hear abort"]),
        (2.0, recovery(), ["flood status w2 done=4"]),  # w0 coordinates, but never decides
        (2.0 + patience, status("w0", 4), [
            "flood status w0 done=4",
            "flood crash w2",  # confirmed: nobody waits for w2 any more
            "report evicted",
            "hear installed", "trainer redoes", "report installed 0 5 True",
        ]),
        (2.1 + patience, boundary(5), ["trainer waits", "hear rejoin"]),
    ])  # fmt: skip
    assert h.membership.view.paused and "w2" not in h.membership.view.members


def test_a_member_out_of_patience_says_it_is_gone_in_the_epoch_of_its_pending_view() -> None:
    """A planned view of epoch 1 is agreed but not in force here when the recovery stalls
    (the soak's round: a leaver exited before its last totals reached w2). Members already
    in epoch 1 take a crash made in epoch 0 for stale and would wait for w2 for ever, so
    its own crash is said in epoch 1."""
    patience = RECOVERY_PATIENCE * FAILURE_TIMEOUT_S
    flooded: list[Proposal] = []

    def capture(h: Harness) -> None:
        log_flood = h.out.flood
        h.out.flood = lambda m: (flooded.append(m), log_flood(m))  # type: ignore[method-assign]

    run_table("w2", W3, [
        (0.5, event(capture), None),
        (1.0, decision(mesh("w0", "w2").model_copy(update={"epoch": 1}), 9), None),
        (2.0, silent("w1"), None),
        (2.0, recovery(), None),
        (2.0 + patience, status("w0", 4), None),
    ])  # fmt: skip
    gone = [
        m
        for m in flooded
        if isinstance(m, Proposal) and m.kind == "crash" and m.subject == "w2" and m.confirmed
    ]
    assert [m.epoch for m in gone] == [1]


def test_a_paused_member_keeps_the_first_planned_decision_that_admits_it() -> None:
    """w3, paused in a minority, hears the majority's next decisions in turn: two without
    it (link ups), the one that admits it back (its state copy is sent for that one), and
    one that admits another member a step later. It must install the one that admits it:
    taking the latest instead, it refused the state sent for the earlier one and waited
    for ever, while the others waited for it (the soak's rounds 2 and 14)."""

    def pause(h: Harness) -> None:
        h.membership.view = h.membership.view.model_copy(update={"paused": True})

    without, grown = mesh("w0", "w1", "w2"), mesh("w0", "w1", "w2", "w3", "w4")
    h = run_table("w3", W4, [
        (0.5, event(pause), None),
        (1.0, decision(without.model_copy(update={"epoch": 2}), 42), None),
        (1.1, decision(without.model_copy(update={"epoch": 3}), 43), None),
        (1.2, decision(W4.model_copy(update={"epoch": 4}), 44, joins=("w3",)), None),
        (1.3, decision(grown.model_copy(update={"epoch": 5}), 45, joins=("w4",)), None),
    ])  # fmt: skip
    assert h.membership.pending is not None and h.membership.pending.view.epoch == 4


def test_a_decision_agreed_before_a_member_paused_does_not_admit_it() -> None:
    """w3 agreed the root's leave (epoch 2, w3 still a member) but never reached its step:
    its parent left before passing the last total down, and w3 paused itself out. The
    decision that joins it back (epoch 4) is the one it takes its state copy for: it used
    to wait for a state for the leave, which holds it but sends it nothing, and refuse the
    one sent for its join as meant for another decision (the soak's stall after a root's
    leave)."""

    def pause(h: Harness) -> None:
        h.membership.view = h.membership.view.model_copy(update={"paused": True})

    leave = mesh("w1", "w2", "w3")
    h = run_table("w3", W4, [
        (0.4, decision(leave.model_copy(update={"epoch": 2}), 40), None),
        (0.5, event(pause), None),
        (1.0, decision(W4.model_copy(update={"epoch": 4}), 44, joins=("w3",)), None),
        (1.1, decision(W4.model_copy(update={"epoch": 5}), 45), None),
    ])  # fmt: skip
    assert h.membership.pending is not None and h.membership.pending.view.epoch == 4


def test_a_paused_member_that_withdraws_from_its_admission_can_be_admitted_again() -> None:
    """The state for the decision that admits w3 never comes (or fails its witness): w3
    withdraws; that decision leaves its queue, so a later one that admits it is taken."""

    def pause(h: Harness) -> None:
        h.membership.view = h.membership.view.model_copy(update={"paused": True})

    def withdraw(h: Harness) -> None:
        h.membership.withdraw(h.membership.pending, h.now)

    h = run_table("w3", W4, [
        (0.5, event(pause), None),
        (1.0, decision(W4.model_copy(update={"epoch": 4}), 44, joins=("w3",)), None),
        (2.0, event(withdraw), None),
        (2.5, decision(W4.model_copy(update={"epoch": 6}), 60, joins=("w3",)), None),
    ])  # fmt: skip
    assert h.membership.pending is not None and h.membership.pending.view.epoch == 6


# ---------------------------------------------------------------------- resets, majority, zero


def test_a_reset_link_redoes_the_step_in_the_same_membership() -> None:
    async def reset(h: Harness) -> None:
        h.membership.reset("w1", h.now)

    h = run_table("w0", W3, [
        (1.0, reset, ["report detected reset w0 w1", "flood reset w0-w1", "hear abort"]),
        (1.0, recovery(), ["flood status w0 done=4"]),
        (1.1, status("w1", 4), ["flood status w1 done=4"]),
        (1.2, status("w2", 4), [
            "flood status w2 done=4",
            "connect w1", "connect w2",
            f"flood decision e1 w0,w1,w2 root=w0 {STAR3} T=5",
            "report agreed 1 5",
            "hear installed", "trainer redoes", "report installed 1 5 False",
        ]),
    ])  # fmt: skip
    assert sorted(h.membership.view.members) == ["w0", "w1", "w2"]


@pytest.mark.parametrize(
    "kind, majority",
    [("suspect", False), ("crash", True)],  # cut off may be training elsewhere; dead is not
)
def test_suspects_count_in_the_majority_and_confirmed_crashes_do_not(
    kind: str, majority: bool
) -> None:
    outcome = next_view(W4, [Change(kind, "w0"), Change(kind, "w1")], side_of="w2")
    assert outcome.majority is majority and sorted(outcome.view.members) == ["w2", "w3"]


def test_when_every_member_leaves_the_view_is_empty_and_everybody_stops() -> None:
    h = run_table("w0", W3, [
        (1.0, proposal("leave", "w1"), None),
        (1.0, proposal("leave", "w2"), None),
        (1.0, command("leave"), None),
        (1.1, boundary(7), None),  # w1 is out; then w2 and w0 are decided together
        (1.2, boundary(9), None),
    ])  # fmt: skip
    assert h.membership.view.members == {} and h.membership.view.root == ""
    assert h.out.log[-1] == "trainer stops"


def test_a_training_member_a_paused_minority_left_out_goes_on_without_it() -> None:
    """w1 took w0, whose loop was busy (not dead), for crashed: alone, w1 is a minority of
    two and paused itself. w0 hears that view: taking it would leave nobody training and
    nobody to admit anybody (the job stood still for good). w0 goes on without w1, which
    asks back as any paused member does."""
    pair = mesh("w0", "w1")
    lonely = next_view(pair, [Change("suspect", "w0")], side_of="w1")
    assert lonely.view.paused and not lonely.majority
    theirs = recovered(lonely.view, "w1", 5)
    h = run_table("w0", pair, [
        (2.0, arrives(theirs), [
            "flood decision e1 w1 root=w1 tree= paused T=5",  # the others judge it alike
            "report agreed 1 5",
            "report detected crash w1",  # heard lately, but it paused: gone from this side
            "flood crash w1",
            "hear abort",
        ]),
        (2.0, recovery(), [
            "flood status w0 done=4",
            "flood decision e1 w0 root=w0 tree= T=5",
            "report agreed 1 5",
            "hear installed", "trainer redoes", "report installed 1 5 False",
        ]),
        (2.1, boundary(5), ["trainer waits", "trainer trains"]),
    ])  # fmt: skip
    assert describe(h.membership.view) == "e1 w0 root=w0 tree="
    assert not h.membership.view.paused
