"""The ids of flooded messages stay bounded without letting a flood loop.

A member keeps the id of every flooded message it took in, so that a copy coming back over
another path is not acted on and forwarded again. The ids are forgotten by age: the
protocol's after `SEEN_EPOCHS` epochs (older messages are refused as stale before their id
is looked up), heartbeats' by arrival time, and past a hard limit the oldest first.
"""

from __future__ import annotations

import pytest
from chaos_worker.membership.protocol import Membership
from chaos_worker.membership.seen import SEEN_EPOCHS, Flooded, SeenIds
from chaos_worker.membership.view import View, full_mesh, initial_view
from chaos_worker.net.bounds import Rejections
from chaos_worker.net.wire import Decision, Proposal
from chaos_worker.ports import Progress
from chaos_worker.telemetry.telemetry import Telemetry

from tests.unit.test_membership_protocol import Recorder

pytestmark = pytest.mark.security

MEMBERS = {m: f"h:{m}" for m in ("w0", "w1", "w2")}
BASE = initial_view(MEMBERS, full_mesh(MEMBERS))


def _view(epoch: int) -> View:
    return BASE.model_copy(update={"epoch": epoch})


def _proposal(key: str, epoch: int, kind: str = "leave", origin: str = "w1") -> Proposal:
    address = "127.0.0.1:1" if kind == "join" else ""
    return Proposal(
        id=key,
        origin=origin,
        kind=kind,
        subject=origin,
        address=address,
        detected_at=0.0,
        epoch=epoch,
    )


def test_ids_are_kept_for_seen_epochs_and_then_forgotten() -> None:
    flooded = Flooded(Rejections())
    for epoch in range(200):
        flooded.installed(epoch)
        for n in range(10):
            assert flooded.first(_proposal(f"p{epoch}.{n}", epoch))
        # a copy of anything still within the window is recognised: no loop
        oldest = max(0, epoch - SEEN_EPOCHS)
        assert not flooded.first(_proposal(f"p{oldest}.0", oldest))
    assert len(flooded) <= 10 * (SEEN_EPOCHS + 1)


def test_a_message_older_than_the_window_is_refused_as_stale_not_taken_again() -> None:
    rejections = Rejections()
    flooded = Flooded(rejections)
    flooded.installed(0)
    assert flooded.first(_proposal("old", 0))
    flooded.installed(SEEN_EPOCHS + 5)  # its id is forgotten now ...
    assert not flooded.first(_proposal("old", 0))  # ... but it cannot come in again
    assert rejections.counts["stale"] == 1


def test_ways_back_in_carry_old_epochs_and_are_never_stale() -> None:
    rejections = Rejections()
    flooded = Flooded(rejections)
    flooded.installed(100)
    assert flooded.first(_proposal("newcomer", -1, kind="join", origin="w9"))
    assert flooded.first(_proposal("paused-long", 3, kind="link_up"))
    assert not flooded.first(_proposal("newcomer", -1, kind="join", origin="w9"))
    assert rejections.counts["stale"] == 0


def test_seen_ids_past_the_limit_forget_the_oldest_first() -> None:
    seen = SeenIds(limit=100)
    for n in range(250):
        assert seen.add(f"hb:{n}", n // 10)  # ten per second
    assert len(seen) == 100
    assert seen.add("hb:0", 0)  # the oldest went first ...
    assert not seen.add("hb:249", 24)  # ... the newest are still known
    seen.forget_before(24)
    assert len(seen) == 10


def test_a_member_drops_a_stale_proposal_without_forwarding_and_counts_it() -> None:
    out = Recorder()
    rejections = Rejections()
    clock = lambda: 0.0  # noqa: E731
    membership = Membership(
        "w0",
        outbox=out,
        clock=clock,
        progress=Progress(step=5, completed=4),
        telemetry=Telemetry("w0", outbox=out, clock=clock, metrics=None),
        failure_timeout_s=1.0,
        reject=rejections,
    )
    membership.begin(BASE)
    out.links.update({"w1", "w2"})
    latest = SEEN_EPOCHS + 3
    decision = Decision(id="d", origin="w0", view=_view(latest), effective_step=5, immediate=False)
    membership.install(decision, 0.0)
    out.log.clear()
    membership.on_proposal(_proposal("ancient", 1), 0.0)
    assert out.log == []  # neither acted on nor forwarded
    assert rejections.counts["stale"] == 1
    membership.on_proposal(_proposal("current", latest), 0.0)
    membership.on_proposal(_proposal("current", latest), 0.0)  # a copy: once only
    assert out.log.count("flood leave w1") == 1
