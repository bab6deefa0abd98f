"""The `Transport` contract, run against `TcpTransport` and the in-memory `LoopTransport`.

The same scenarios for both (the shape of torchft's shared transport conformance helper):
FIFO per peer with intact payloads, a goodbye before a graceful close, blocked links dropping
frames both ways, payload limits. TCP runs over real loopback sockets, so its cases belong to
the cluster tier; the in-memory ones are unit tests. Waits poll a condition with a generous
deadline that only turns a hang into a failure; nothing asserts on time.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
from collections.abc import Callable

import pytest
from chaos_worker.net.loop import LoopNetwork
from chaos_worker.net.shaping import LinkShape
from chaos_worker.net.transport import TcpTransport, TransportFactory
from chaos_worker.net.wire import Ping

from tests.transportkit import chunk, close_all, start, until

NewFactory = Callable[[], TransportFactory]


def _tcp() -> TransportFactory:
    return TcpTransport


def _loop() -> TransportFactory:
    return LoopNetwork().factory()


@pytest.fixture(
    params=[
        pytest.param(_tcp, id="tcp", marks=pytest.mark.cluster),
        pytest.param(_loop, id="loop", marks=pytest.mark.unit),
    ]
)
def new_factory(request: pytest.FixtureRequest) -> NewFactory:
    """Makes the factory inside the test's own event loop (a loop network is per loop)."""
    return request.param


def test_frames_arrive_in_fifo_order_with_their_payloads(new_factory: NewFactory) -> None:
    async def scenario() -> None:
        factory = new_factory()
        a, b, c = (
            await start("a", factory=factory),
            await start("b", factory=factory),
            await start("c", factory=factory),
        )
        a.transport.connect("b", b.address)
        c.transport.connect("b", b.address)
        b.transport.connect("a", a.address)
        rng = random.Random(7)
        sizes = [0, 1, 7, 4096, 65536, 300_000, 2_500_000] + [
            rng.randrange(0, 200_000) for _ in range(60)
        ]
        sent = {sender: [rng.randbytes(size) for size in sizes] for sender in ("a", "c")}
        for index in range(len(sizes)):
            for sender, node in (("a", a), ("c", c)):
                payload = sent[sender][index]
                view = memoryview(payload) if index % 2 else payload
                assert node.transport.send("b", chunk(sender, index, count=len(sizes)), view)
        assert b.transport.send("a", Ping(sender="b", sent_at=1.0))
        await until(lambda: len(b.got) == 2 * len(sizes), "every frame at b")
        await until(lambda: len(a.got) == 1, "the ping at a")
        for sender in ("a", "c"):
            assert [m.index for m in b.messages_from(sender)] == list(range(len(sizes)))
            assert b.payloads_from(sender) == sent[sender]
            assert all(memoryview(p).readonly for p in b.payloads_from(sender))
        assert a.got[0][0] == "b" and isinstance(a.got[0][1], Ping)
        assert b.gone == [] and a.gone == [] and c.gone == []
        await close_all(a, b, c)

    asyncio.run(scenario())


def test_block_stops_both_directions_with_a_goodbye_and_unblock_restores(
    new_factory: NewFactory,
) -> None:
    async def scenario() -> None:
        factory = new_factory()
        a, b = await start("a", factory=factory), await start("b", factory=factory)
        a.transport.connect("b", b.address)
        b.transport.connect("a", a.address)
        assert a.transport.send("b", chunk("a", 0), b"a0")
        assert b.transport.send("a", chunk("b", 0), b"b0")
        await until(lambda: len(a.got) == 1 and len(b.got) == 1, "the first frames")

        a.transport.block("b")
        assert a.transport.is_blocked("b")
        assert not a.transport.send("b", chunk("a", 1), b"a1")
        await until(lambda: b.gone, "b to see a's link go")
        assert b.gone == [("a", True)]
        # b does not know yet: its frames go out but a refuses them.
        b.transport.send("a", chunk("b", 1), b"b1")
        b.transport.disconnect("a")  # what b's owner does once it learns the link is down

        a.transport.unblock("b")
        assert not a.transport.is_blocked("b")
        a.transport.connect("b", b.address)
        b.transport.connect("a", a.address)
        assert a.transport.send("b", chunk("a", 2), b"a2")
        assert b.transport.send("a", chunk("b", 2), b"b2")
        await until(lambda: len(a.got) == 2 and len(b.got) == 2, "frames after unblock")
        assert a.payloads_from("b") == [b"b0", b"b2"]
        assert b.payloads_from("a") == [b"a0", b"a2"]
        assert a.gone == []  # a blocked b itself: no disconnect reported for it
        await close_all(a, b)

    asyncio.run(scenario())


def test_disconnect_without_goodbye_is_not_graceful(new_factory: NewFactory) -> None:
    async def scenario() -> None:
        factory = new_factory()
        a, b = await start("a", factory=factory), await start("b", factory=factory)
        a.transport.connect("b", b.address)
        assert a.transport.send("b", chunk("a", 0), b"x")
        await until(lambda: len(b.got) == 1, "the frame at b")
        a.transport.disconnect("b")
        await until(lambda: b.gone, "b to see the link drop")
        assert b.gone == [("a", False)]

        a.transport.connect("b", b.address)
        assert a.transport.send("b", chunk("a", 1), b"y")
        await until(lambda: len(b.got) == 2, "the frame after reconnecting")
        a.transport.disconnect("b", goodbye=True)
        await until(lambda: len(b.gone) == 2, "b to see the second link go")
        assert b.gone[1] == ("a", True)
        await close_all(a, b)

    asyncio.run(scenario())


def test_frame_over_max_payload_closes_the_link_undelivered(new_factory: NewFactory) -> None:
    async def scenario() -> None:
        factory = new_factory()
        a, b = (
            await start("a", factory=factory),
            await start("b", max_payload=1024, factory=factory),
        )
        a.transport.connect("b", b.address)
        assert a.transport.send("b", chunk("a", 0), bytes(1024))
        assert a.transport.send("b", chunk("a", 1), bytes(1025))
        a.transport.send("b", chunk("a", 2), b"late")
        await until(lambda: b.gone, "b to drop the link")
        assert b.gone == [("a", False)]
        assert [m.index for m in b.messages_from("a")] == [0]
        assert b.payloads_from("a") == [bytes(1024)]
        await close_all(a, b)

    asyncio.run(scenario())


def test_reachable_tells_a_listener_from_a_dead_address(new_factory: NewFactory) -> None:
    async def scenario() -> None:
        factory = new_factory()
        a, b = await start("a", factory=factory), await start("b", factory=factory)
        assert await a.transport.reachable(b.address, 5.0) is True
        await b.transport.close()
        assert await a.transport.reachable(b.address, 5.0) is False  # nothing listens
        await close_all(a)

    asyncio.run(scenario())


@pytest.mark.cluster
def test_a_reset_tcp_connection_is_reported_and_the_link_opens_again() -> None:
    """A real RST (SO_LINGER 0, then close) on the receiver's end of a live link: the
    receiver hears a disconnect that is not graceful; the sender opens the link again and
    frames queued after the break arrive, in order."""

    async def scenario() -> None:
        a, b = await start("a"), await start("b")
        a.transport.connect("b", b.address)
        assert a.transport.send("b", chunk("a", 0))
        await until(lambda: len(b.got) == 1, "the first frame")
        (writer,) = b.transport._in["a"]  # the receiving end of a's link
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # RST, as a middlebox or `ss -K` would cause
        await until(lambda: b.gone == [("a", False)], "the reset reported")
        index = 1
        while not any(m.index >= 1 for m in b.messages_from("a")):
            assert a.transport.send("b", chunk("a", index))  # the link is still usable
            index += 1
            await asyncio.sleep(0.01)
            assert index < 10_000, "the link never opened again"
        received = [m.index for m in b.messages_from("a")]
        assert received == sorted(received)  # in order; those in flight may be lost
        await close_all(a, b)

    asyncio.run(scenario())


def test_close_flushes_what_is_queued_before_it_goes(new_factory: NewFactory) -> None:
    """A member that leaves closes its transport right after its last step, then exits:
    the totals it queued for its children must be written by then (`close` used to return
    at once, and a child waited for its last totals for ever), then its goodbye."""

    async def scenario() -> None:
        factory = new_factory()
        a, b = await start("a", factory=factory), await start("b", factory=factory)
        a.transport.connect("b", b.address)
        payloads = [bytes([i]) * 600_000 for i in range(8)]
        for index, payload in enumerate(payloads):
            assert a.transport.send("b", chunk("a", index, count=len(payloads)), payload)
        pumps = [link.task for link in a.transport._out.values()]  # type: ignore[attr-defined]
        await a.transport.close()  # at once: nothing has been written yet
        # what a leaver's process does next is exit: close returns once all is written
        assert pumps and all(task.done() for task in pumps)
        await until(lambda: b.gone, "a's goodbye at b")
        assert b.payloads_from("a") == payloads
        assert b.gone == [("a", True)]
        await close_all(b)

    asyncio.run(scenario())


def test_close_flushes_links_dropped_with_a_goodbye_before_it(new_factory: NewFactory) -> None:
    """A leaver installs the view without itself first, which drops its links with a
    goodbye (queued behind its last totals), then closes its transport and exits. Over a
    link with a delay those frames are still waiting when `close` is called: it used to see
    only the links still held, return at once, and the child took the closed link for a
    crash and never got its last total (the soak's stall after a root's leave)."""

    async def scenario() -> None:
        factory = new_factory()
        delayed = LinkShape(delay_s=0.05)
        a = await start("a", factory=factory, shape=lambda _peer: delayed)
        b = await start("b", factory=factory)
        a.transport.connect("b", b.address)
        assert a.transport.send("b", chunk("a", 0, count=1), b"last total")
        pumps = [link.task for link in a.transport._out.values()]  # type: ignore[attr-defined]
        a.transport.disconnect("b", goodbye=True)  # the leaver's new view has no links
        await a.transport.close()
        # what a leaver's process does next is exit: close returns once all is written
        assert pumps and all(task.done() for task in pumps)
        await until(lambda: b.gone, "a's goodbye at b")
        assert b.payloads_from("a") == [b"last total"]
        assert b.gone == [("a", True)]
        await close_all(b)

    asyncio.run(scenario())
