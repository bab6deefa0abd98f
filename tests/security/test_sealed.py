"""Sealed links (`chaos_worker.net.sealed`): after the TLS handshake a link's frames travel
as AES-256-GCM records on the bare socket. A real worker listener and a real client over
TLS; the man in the middle is played by changing what the client's socket is given after
its records are sealed (the bytes on the wire), which is what one on the path could do.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable

from chaos_operator.federation.workerca import WorkerCA
from chaos_worker.net import sealed
from chaos_worker.net.transport import parse_address
from chaos_worker.net.wire import Hello, Ping

from tests.security.test_identities import client_context, frames, secure
from tests.transportkit import DEADLINE_S, Node, close_all, until

MARK = 31415.9265


Wire = Callable[[bytes], None]


async def tapped(
    address: str, ctx: ssl.SSLContext, change: Callable[[bytes], bytes]
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, list[bytes], Wire]:
    """A sealed link to `address` whose every record goes out through `change`; returns
    its reader, its writer, the bytes that went out, and a write of raw bytes."""
    reader, bare = await asyncio.open_connection(*parse_address(address))
    writer = (await sealed.connect(reader, bare, ctx)).seal()
    wire: list[bytes] = []
    send = bare.transport.write

    def on_the_wire(data: bytes | bytearray | memoryview) -> None:
        out = change(bytes(data))
        wire.append(out)
        send(out)

    bare.transport.write = on_the_wire  # type: ignore[method-assign]
    return reader, writer, wire, send


async def first_ping(
    ca: WorkerCA, change: Callable[[bytes], bytes]
) -> tuple[Node, asyncio.StreamReader, asyncio.StreamWriter, Wire]:
    """A listening w0 and a sealed link from w1 through `change` (`tapped`) that said
    Hello and sent one Ping, which w0 has. Hold the writer: one collected closes its
    connection."""
    w0 = await secure("w0", ca.issue("w0"))
    ctx = client_context(str(ca.ca_file), ca.issue("w1"))
    reader, writer, _, send = await tapped(w0.address, ctx, change)
    writer.write(frames(Hello(sender="w1"), Ping(sender="w1", sent_at=1.0)))
    await until(lambda: len(w0.got) == 1, "the first ping")
    return w0, reader, writer, send


async def ends(reader: asyncio.StreamReader) -> bool:
    """Whether the server closes the link (it sends nothing on a sealed one)."""
    try:
        while await asyncio.wait_for(reader.read(1 << 16), DEADLINE_S):
            pass
    except ConnectionError:
        pass
    return True


def test_frames_cross_sealed_and_arrive_whole(ca: WorkerCA) -> None:
    async def scenario() -> None:
        w0 = await secure("w0", ca.issue("w0"))
        ctx = client_context(str(ca.ca_file), ca.issue("w1"))
        _, writer, wire, _ = await tapped(w0.address, ctx, lambda data: data)
        writer.write(frames(Hello(sender="w1"), Ping(sender="w1", sent_at=MARK)))
        await until(lambda: len(w0.got) == 1, "w1's ping")
        assert w0.got[0][1].sent_at == MARK
        # what crossed the wire does not show the header's contents
        assert str(MARK).encode() not in b"".join(wire) and b"w1" not in b"".join(wire)
        writer.close()
        await close_all(w0)

    asyncio.run(scenario())


def test_a_changed_record_is_refused_and_drops_the_link(ca: WorkerCA) -> None:
    def flip_last(data: bytes) -> bytes:  # a bit of the tag of the second record
        return data[:-1] + bytes([data[-1] ^ 1]) if flip_last.count else data

    flip_last.count = 0

    async def scenario() -> None:
        w0, reader, writer, _ = await first_ping(ca, flip_last)
        flip_last.count = 1
        writer.write(frames(Ping(sender="w1", sent_at=2.0)))
        assert await ends(reader)
        assert w0.transport.guard.rejections.counts["forged"] == 1
        assert [m.sent_at for _, m, _ in w0.got] == [1.0]
        await close_all(w0)

    asyncio.run(scenario())


def test_a_record_replayed_on_its_link_is_refused(ca: WorkerCA) -> None:
    sent: list[bytes] = []

    def keep(data: bytes) -> bytes:
        sent.append(data)
        return data

    async def scenario() -> None:
        w0, reader, writer, send = await first_ping(ca, keep)  # held: see `first_ping`
        assert len(sent) == 1  # one record: the Hello and the Ping
        send(sent[0])  # the same record again
        assert await ends(reader)
        assert w0.transport.guard.rejections.counts["forged"] == 1
        assert len(w0.got) == 1
        writer.close()
        await close_all(w0)

    asyncio.run(scenario())


def test_a_record_length_out_of_bounds_is_refused_before_it_is_read(ca: WorkerCA) -> None:
    async def scenario() -> None:
        w0, reader, writer, send = await first_ping(ca, lambda data: data)  # held
        # 4 GiB announced; nothing follows, so a reader that waited for it would hang
        send(b"\xff\xff\xff\xff")
        assert await ends(reader)
        assert w0.transport.guard.rejections.counts["oversize"] == 1
        writer.close()
        await close_all(w0)

    asyncio.run(scenario())


def test_both_sides_replace_the_key_in_step() -> None:
    """Every `rekey_every` records the key changes (`next_key`) on both sides alike: the
    records open across the change, and one sealed under the old key no longer does."""
    key = bytes(range(32))
    writer, reader = sealed._Records(key, rekey_every=2), sealed._Records(key, rekey_every=2)
    stale = sealed._Records(key, rekey_every=1 << 30)
    for n in range(5):
        plain = memoryview(bytes([n]) * 100)
        record = writer.seal(plain)
        old = stale.seal(plain)
        length, body = bytes(record[:4]), record[4:]
        into = memoryview(bytearray(100))
        reader.open(length, body, into)
        assert bytes(into) == bytes(plain)
        assert (bytes(old) == bytes(record)) == (n < 2)  # the same until the first change
    assert sealed.next_key(key) != key and len(sealed.next_key(key)) == sealed.KEY_BYTES
