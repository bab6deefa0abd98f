"""TcpTransport over real loopback sockets: FIFO delivery, big payloads, blocked links, crashes.

Every test drives its own event loop with `asyncio.run`. Waits poll a condition with a
generous deadline that only turns a hang into a failure; nothing asserts on time.
"""

from __future__ import annotations

import array
import asyncio
import hashlib
import random
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from chaos_worker.net.transport import TcpTransport
from chaos_worker.net.wire import Chunk, Message, Ping

pytestmark = pytest.mark.cluster

DEADLINE_S = 30.0


@dataclass
class Node:
    """A listening TcpTransport that records what it delivers."""

    name: str
    transport: TcpTransport = field(repr=False)
    address: str = ""
    got: list[tuple[str, Message, bytes]] = field(default_factory=list)
    gone: list[tuple[str, bool]] = field(default_factory=list)

    def payloads_from(self, sender: str) -> list[bytes]:
        return [payload for who, _, payload in self.got if who == sender]

    def messages_from(self, sender: str) -> list[Message]:
        return [message for who, message, _ in self.got if who == sender]


async def start(name: str, *, max_payload: int = 1 << 30) -> Node:
    got: list[tuple[str, Message, bytes]] = []
    gone: list[tuple[str, bool]] = []
    transport = TcpTransport(
        name,
        lambda sender, message, payload: got.append((sender, message, payload)),
        lambda peer, graceful: gone.append((peer, graceful)),
        max_payload=max_payload,
    )
    port = await transport.listen("127.0.0.1", 0)
    return Node(name, transport, f"127.0.0.1:{port}", got, gone)


async def until(condition: Callable[[], bool], what: str) -> None:
    """Poll `condition` until it holds; fail (not hang) after a generous deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0.005)


def chunk(sender: str, index: int, *, count: int = 1) -> Chunk:
    return Chunk(sender=sender, epoch=0, step=0, phase="up", index=index, count=count)


async def close_all(*nodes: Node) -> None:
    for node in nodes:
        await node.transport.close()


def test_frames_arrive_in_fifo_order_with_their_payloads() -> None:
    async def scenario() -> None:
        a, b, c = await start("a"), await start("b"), await start("c")
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
            assert all(type(p) is bytes for p in b.payloads_from(sender))
        assert a.got[0][0] == "b" and isinstance(a.got[0][1], Ping)
        assert b.gone == [] and a.gone == [] and c.gone == []
        await close_all(a, b, c)

    asyncio.run(scenario())


def test_32_mb_payload_arrives_intact_between_small_frames() -> None:
    async def scenario() -> None:
        a, b = await start("a"), await start("b")
        a.transport.connect("b", b.address)
        big = random.Random(1).randbytes(32 << 20)
        floats = array.array("d", range(1 << 20))  # 8 MiB, memoryview format "d"
        assert a.transport.send("b", chunk("a", 0), b"before")
        assert a.transport.send("b", chunk("a", 1), big)
        assert a.transport.send("b", chunk("a", 2), memoryview(floats))
        assert a.transport.send("b", chunk("a", 3), b"after")
        await until(lambda: len(b.got) == 4, "four frames at b")
        assert [m.index for m in b.messages_from("a")] == [0, 1, 2, 3]
        before, got_big, got_floats, after = b.payloads_from("a")
        assert (before, after) == (b"before", b"after")
        assert len(got_big) == len(big)
        assert hashlib.sha256(got_big).hexdigest() == hashlib.sha256(big).hexdigest()
        assert got_floats == floats.tobytes()
        await close_all(a, b)

    asyncio.run(scenario())


def test_block_stops_both_directions_with_a_goodbye_and_unblock_restores() -> None:
    async def scenario() -> None:
        a, b = await start("a"), await start("b")
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


def test_disconnect_without_goodbye_is_not_graceful() -> None:
    async def scenario() -> None:
        a, b = await start("a"), await start("b")
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


PEER = """
import asyncio, sys
from chaos_worker.net.transport import TcpTransport
from chaos_worker.net.wire import Ping

async def main():
    transport = TcpTransport("ghost", lambda *_: None, lambda *_: None, max_payload=1024)
    transport.connect("b", sys.argv[1])
    transport.send("b", Ping(sender="ghost", sent_at=1.0))
    await asyncio.Event().wait()

asyncio.run(main())
"""


def test_killed_peer_process_is_reported_as_not_graceful() -> None:
    async def scenario() -> None:
        b = await start("b")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", PEER, b.address, stdin=subprocess.DEVNULL
        )
        try:
            await until(lambda: b.messages_from("ghost"), "the ghost's ping")
            assert b.gone == []
        finally:
            proc.kill()
            await proc.wait()
        await until(lambda: b.gone, "b to notice the dead process")
        assert b.gone == [("ghost", False)]
        await close_all(b)

    asyncio.run(scenario())


def test_frame_over_max_payload_closes_the_link_undelivered() -> None:
    async def scenario() -> None:
        a, b = await start("a"), await start("b", max_payload=1024)
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
