"""The accepting side's reader (`chaos_worker.net.receiver`) over real loopback sockets.

A raw sender, plaintext or mutual TLS, feeds a guarded `TcpTransport` the bytes of its
frames in pieces, each read by the receiver before the next is sent; what is checked is
what it delivered, what it counted, the bytes it read and the tokens it took. Waits poll
with a generous deadline; nothing asserts on time.
"""

from __future__ import annotations

import asyncio
import functools
import random
import socket
import ssl
import threading
import tracemalloc
from pathlib import Path

import pytest
from chaos_operator.federation.workerca import WorkerCA
from chaos_worker.net import sealed
from chaos_worker.net.bounds import Guard, Limits
from chaos_worker.net.receiver import BUFFER_BYTES
from chaos_worker.net.shaping import TokenBucket
from chaos_worker.net.tls import LinkTls
from chaos_worker.net.transport import TcpTransport, parse_address
from chaos_worker.net.wire import Hello, Ping, encode

from tests.security.kit import closed_by_peer
from tests.transportkit import Node, chunk, close_all, start, until

pytestmark = pytest.mark.cluster  # real sockets, as the contract's TCP cases


class _Sealed:
    """A sealed link's writer, with what its records would put on the wire (`wire`)."""

    def __init__(self, bare: asyncio.StreamWriter, writer: asyncio.StreamWriter | None) -> None:
        assert writer is not None
        self.bare, self._writer = bare, writer

    def __getattr__(self, name: str):
        return getattr(self._writer, name)

    def wire(self, data: bytes) -> bytes:
        """The records `data` is sealed into, not sent."""
        out: list[bytes] = []
        transport = self.bare.transport
        transport.write = lambda record: out.append(bytes(record))  # type: ignore[method-assign]
        try:
            self._writer.write(data)
        finally:
            del transport.write  # the class's own again
        return b"".join(out)


def _frame(message, payload: bytes = b"") -> bytes:
    return b"".join(bytes(part) for part in encode(message, payload))


async def _receiver(tls: LinkTls | None, **limits: int | float) -> Node:
    node = await start("b", factory=TcpTransport.secured(tls))
    node.transport.guard = Guard(Limits(**limits))
    return node


async def _said_hello(node: Node, address: str, ctx: ssl.SSLContext | None, name: str):
    """A raw connection to `node` (sealed with `ctx`: `sealed.connect`) that said Hello as
    `name`, and the receiver's link."""
    reader, writer = await asyncio.open_connection(*parse_address(address))
    if ctx is not None:
        writer = _Sealed(writer, (await sealed.connect(reader, writer, ctx)).seal())
    writer.write(_frame(Hello(sender=name)))
    await writer.drain()
    incoming = node.transport._in  # type: ignore[attr-defined]
    await until(lambda: incoming.get(name), "the Hello read")
    (link,) = incoming[name]
    return reader, writer, link


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "tls"])
def test_a_payload_that_arrives_in_many_small_pieces_is_delivered_whole(
    secure: bool, tmp_path: Path
) -> None:
    """Prefix, header and payload split anywhere, down to single bytes, each piece read
    before the next is written: the payload is delivered whole, identical, read-only."""

    async def scenario() -> None:
        ca = WorkerCA(tmp_path / "ca", "local") if secure else None
        tls = LinkTls(ca.issue("b"), "b") if ca else None
        node = await _receiver(tls)
        ctx = LinkTls(ca.issue("a"), "a").client if ca else None
        _reader, writer, link = await _said_hello(node, node.address, ctx, "a")
        rng = random.Random(5)
        payloads = [rng.randbytes(200_000), rng.randbytes(3000)]
        data = b"".join(_frame(chunk("a", i, count=2), p) for i, p in enumerate(payloads))
        data += _frame(Ping(sender="a", sent_at=1.0))
        sealing = writer  # held: a writer collected closes its connection
        if secure:  # the records cut anywhere, as their bytes cross the wire
            data, writer = sealing.wire(data), sealing.bare
        before, at, cuts = link.received, 0, [1, 2, 5]  # the first prefix a few bytes at once
        while at < len(data):
            size = cuts.pop(0) if cuts else rng.choice([1, 7, 100, 1500, 9000, 40_000])
            writer.write(data[at : at + size])
            at = min(at + size, len(data))
            await writer.drain()
            await until(lambda at=at: link.received == before + at, "the piece read")
        await until(lambda: len(node.got) == 3, "both chunks and the ping")
        assert node.payloads_from("a")[:2] == payloads
        assert all(memoryview(p).readonly for p in node.payloads_from("a")[:2])
        assert isinstance(node.got[2][1], Ping) and node.got[2][2] == b""
        sealing.close()
        await close_all(node)

    asyncio.run(scenario())


def test_a_refused_payload_is_read_to_nothing_and_the_link_goes_on() -> None:
    """A chunk over its type's limit (not the hard limit) is refused on its header; its
    8 MiB are read through the small buffer, never allocated, and the next frame is read."""
    size = 8 << 20

    async def scenario() -> None:
        node = await _receiver(None, chunk_bytes=1024)
        host, port = parse_address(node.address)
        data = _frame(Hello(sender="a")) + _frame(chunk("a", 0), bytes(size))
        data += _frame(Ping(sender="a", sent_at=1.0))
        sock = socket.create_connection((host, port))
        tracemalloc.start()
        try:
            sender = threading.Thread(target=sock.sendall, args=(data,))
            sender.start()  # a thread: the loop only reads
            await until(lambda: node.got, "the ping after the refused chunk")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        await asyncio.to_thread(sender.join)
        assert [type(m) for m in node.messages_from("a")] == [Ping]
        assert node.transport.guard.rejections.counts["oversize"] == 1
        assert peak < size // 8  # the buffer and the loop's own, not the payload
        assert node.gone == []
        sock.close()
        await close_all(node)

    asyncio.run(scenario())


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "tls"])
def test_a_peer_that_stops_mid_payload_is_closed_after_the_idle_timeout(
    secure: bool, tmp_path: Path
) -> None:
    async def scenario() -> None:
        ca = WorkerCA(tmp_path / "ca", "local") if secure else None
        tls = LinkTls(ca.issue("b"), "b") if ca else None
        node = await _receiver(tls, idle_timeout_s=0.2)
        ctx = LinkTls(ca.issue("a"), "a").client if ca else None
        reader, writer, link = await _said_hello(node, node.address, ctx, "a")
        writer.write(_frame(chunk("a", 0), bytes(1 << 20))[:600_000])
        await writer.drain()
        assert await closed_by_peer(reader)
        assert link.received >= 100_000  # it was reading the payload when it stopped
        assert node.got == [] and node.gone == [("a", False)]
        writer.close()
        await close_all(node)

    asyncio.run(scenario())


class _CountingBucket(TokenBucket):
    """A real token bucket that records what it was asked for."""

    def __init__(self, rate_bytes_per_s: float) -> None:
        super().__init__(rate_bytes_per_s)
        self.taken: list[int] = []

    async def consume(self, nbytes: int) -> None:
        self.taken.append(nbytes)
        await super().consume(nbytes)


def test_a_shaped_downlink_reads_no_further_than_its_tokens_allow() -> None:
    """Over a 4 MB/s downlink, 1 MiB in frames of 256 KiB: the bytes read off the socket never
    run ahead of the tokens taken by more than one piece and the small buffer, each piece
    is at most a burst, and every byte of every frame is paid for."""

    async def scenario() -> None:
        bucket = _CountingBucket(4e6)
        node = await start("b", factory=functools.partial(TcpTransport, downlink=bucket))
        a = await start("a")
        a.transport.connect("b", node.address)
        payloads = [bytes([i]) * (256 << 10) for i in range(4)]
        frames = [encode(chunk("a", i, count=4), p) for i, p in enumerate(payloads)]
        for index, payload in enumerate(payloads):
            assert a.transport.send("b", chunk("a", index, count=4), payload)
        await until(lambda: node.transport._in.get("a"), "the link")  # type: ignore[attr-defined]
        (link,) = node.transport._in["a"]  # type: ignore[attr-defined]
        piece = bucket.piece
        ahead = 0
        while len(node.got) < len(payloads):
            ahead = max(ahead, link.received - sum(bucket.taken))
            await asyncio.sleep(0.002)
        assert node.payloads_from("a") == payloads
        hello = len(_frame(Hello(sender="a")))
        assert sum(bucket.taken) == link.received  # the Hello's tokens too
        assert sum(bucket.taken) == hello + sum(len(p) + len(h) + 8 for _, h, p in frames)
        assert max(bucket.taken) <= piece
        assert ahead <= hello + piece + BUFFER_BYTES
        await close_all(a, node)

    asyncio.run(scenario())
