"""The failure detector (`Liveness.watch`) on a fake clock, over a real `Membership`."""

from __future__ import annotations

import asyncio

import pytest
from chaos_worker.membership.liveness import Liveness
from chaos_worker.telemetry.telemetry import Telemetry

from tests.unit.test_membership_protocol import FAILURE_TIMEOUT_S, W3, Harness

pytestmark = pytest.mark.unit

INTERVAL_S = 0.01
"""Heartbeat interval: the detector looks every 5 ms of real time."""


def test_a_member_whose_own_loop_was_held_suspects_nobody_for_it() -> None:
    """w0's event loop is held for 2.5 s (a long synchronous stretch): it read nobody's
    heartbeats meanwhile. It suspects nobody when it runs again; a member that stays
    silent after that is suspected a failure timeout later, one that beats is not."""

    async def scenario() -> None:
        h = Harness("w0", W3)
        clock = lambda: h.now  # noqa: E731
        liveness = Liveness(
            "w0",
            heartbeat_interval_s=INTERVAL_S,
            failure_timeout_s=FAILURE_TIMEOUT_S,
            membership=h.membership,
            telemetry=Telemetry("w0", outbox=h.out, clock=clock, metrics=None),
            outbox=h.out,
            progress=h.progress,
            clock=clock,
        )
        watching = asyncio.ensure_future(liveness.watch())

        async def at(now: float, beating: tuple[str, ...]) -> None:
            h.now = now
            for member in beating:
                liveness.heard_from(member, now)
            await asyncio.sleep(4 * INTERVAL_S)  # the detector looks several times

        for tenth in range(6):
            await at(tenth / 10, ("w1", "w2"))
        await at(3.0, ())  # the loop ran again after 2.5 s: nobody's beats read yet
        assert h.membership.suspects == set()
        now = 3.0
        while now < 3.0 + FAILURE_TIMEOUT_S:  # w1's beats come, w2's never do
            now = round(now + 0.1, 1)
            await at(now, ("w1",))
        assert h.membership.suspects == set()  # exactly the timeout: not yet
        await at(now + 0.1, ("w1",))
        assert h.membership.suspects == {"w2"}
        watching.cancel()

    asyncio.run(scenario())
