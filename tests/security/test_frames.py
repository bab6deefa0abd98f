"""A hostile peer on a raw TCP socket against a real, guarded `TcpTransport`.

Every case checks what the receiver did (delivered, counted, closed) and that it still
serves an honest peer afterwards; waits poll with a generous deadline, nothing is timed.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from chaos_worker.net.wire import FRAME, MAX_HEADER_BYTES, Chunk, Heartbeat, Hello, Ping

from tests.security.kit import attacker, closed_by_peer, frame, raw_frame, receiver
from tests.transportkit import close_all, start, until

pytestmark = pytest.mark.security

GIB4 = (1 << 32) - 1


def _beat(samples_per_s: float | str = 10.0, seq: int = 1) -> dict:
    return {
        "type": "heartbeat",
        "origin": "w9",
        "seq": seq,
        "epoch": 0,
        "step": 3,
        "samples_per_s": samples_per_s,
        "sent_at": 1.0,
    }


async def _honest_peer_is_served(target) -> None:
    """A well-behaved peer connects after the attack and its frames arrive."""
    honest = await start("honest")
    honest.transport.connect("w0", target.node.address)
    assert honest.transport.send("w0", Ping(sender="honest", sent_at=2.0))
    await until(lambda: target.node.messages_from("honest"), "the honest peer's ping")
    await close_all(honest)


def test_a_4gib_length_before_hello_is_refused_unread_and_the_connection_dropped() -> None:
    async def scenario() -> None:
        target = await receiver()
        reader, writer = await attacker(target, hello=None)
        hello = frame(Hello(sender="mallory"))
        writer.write(FRAME.pack(len(hello) - FRAME.size, GIB4) + hello[FRAME.size :])
        await writer.drain()
        assert await closed_by_peer(reader)
        assert target.rejected("oversize") == 1
        assert target.node.got == [] and target.node.gone == []
        await _honest_peer_is_served(target)
        await close_all(target.node)

    asyncio.run(scenario())


def test_three_half_sent_4gib_frames_are_refused_before_any_payload_is_read() -> None:
    """After Hello, three connections each claim a 4 GiB chunk payload and send none of
    it: every claim is refused on its header alone (over the chunk limit), so nothing of
    that size is ever allocated, and the receiver goes on serving."""

    async def scenario() -> None:
        target = await receiver()
        conns = [await attacker(target, hello=f"m{i}") for i in range(3)]
        chunk = Chunk(sender="m", epoch=0, step=0, phase="up", index=0, count=1)
        header = chunk.model_dump_json().encode()
        for _, writer in conns:
            writer.write(FRAME.pack(len(header), GIB4) + header + b"\0" * 1000)
            await writer.drain()
        await until(lambda: target.rejected("oversize") == 3, "three refusals")
        assert target.node.got == []
        await _honest_peer_is_served(target)
        for _, writer in conns:
            writer.close()
        await close_all(target.node)

    asyncio.run(scenario())


def test_a_frame_over_the_hard_limit_drops_the_connection() -> None:
    async def scenario() -> None:
        target = await receiver(state_bytes=1 << 20)  # hard limit: the largest type's
        reader, writer = await attacker(target)
        ping = Ping(sender="mallory", sent_at=1.0).model_dump_json().encode()
        writer.write(FRAME.pack(len(ping), GIB4) + ping)
        await writer.drain()
        assert await closed_by_peer(reader)
        assert target.rejected("oversize") == 1
        await until(lambda: target.node.gone == [("mallory", False)], "the drop reported")
        await close_all(target.node)

    asyncio.run(scenario())


@pytest.mark.parametrize("header_len", [0, MAX_HEADER_BYTES + 1])
def test_a_broken_header_length_drops_the_connection(header_len: int) -> None:
    async def scenario() -> None:
        target = await receiver()
        reader, writer = await attacker(target)
        writer.write(FRAME.pack(header_len, 0))
        await writer.drain()
        assert await closed_by_peer(reader)
        reason = "malformed" if header_len == 0 else "oversize"
        assert target.rejected(reason) == 1
        await close_all(target.node)

    asyncio.run(scenario())


@pytest.mark.parametrize("bad", ["1e999", "-1e999", "NaN", "Infinity", "-Infinity"])
def test_a_non_finite_float_is_refused_at_the_first_hop_and_the_link_goes_on(bad: str) -> None:
    """The heartbeat that used to be forwarded as `null`, then refused by the next hop,
    which dropped the link and suspected the honest forwarder: it stops here, counted,
    and the next frame on the same connection is delivered."""

    async def scenario() -> None:
        target = await receiver()
        _, writer = await attacker(target)
        writer.write(raw_frame(json.dumps(_beat()).replace("10.0", bad, 1)))
        writer.write(frame(Heartbeat.model_validate(_beat(seq=2))))
        await writer.drain()
        await until(lambda: target.node.got, "the good heartbeat")
        assert target.rejected("nonfinite") == 1
        [(sender, beat, _)] = target.node.got
        assert sender == "mallory" and beat.seq == 2
        assert target.node.gone == []
        writer.close()
        await close_all(target.node)

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "header",
    [
        "{",
        '{"type": "launch_missiles"}',
        '{"type": "chunk", "sender": "m", "epoch": 0, "step": 0, "phase": "up", '
        '"index": 5, "count": 2}',
        '{"type": "chunk", "sender": "m", "epoch": 99999999999999999999, "step": 0, '
        '"phase": "up", "index": 0, "count": 1}',
        '{"type": "heartbeat", "origin": "w9", "seq": -5, "epoch": 0, "step": 0, '
        '"samples_per_s": 1, "sent_at": 1}',
    ],
)
def test_a_malformed_message_is_dropped_alone_with_its_payload(header: str) -> None:
    async def scenario() -> None:
        target = await receiver()
        _, writer = await attacker(target)
        writer.write(raw_frame(header, b"x" * 4096))  # its payload is read to nothing
        writer.write(frame(Ping(sender="mallory", sent_at=5.0)))
        await writer.drain()
        await until(lambda: target.node.got, "the ping after it")
        assert target.rejected("malformed") == 1
        assert [m.type for m in target.node.messages_from("mallory")] == ["ping"]
        assert target.node.gone == []
        writer.close()
        await close_all(target.node)

    asyncio.run(scenario())


def test_a_control_message_with_a_payload_is_oversize() -> None:
    async def scenario() -> None:
        target = await receiver()
        _, writer = await attacker(target)
        writer.write(frame(Heartbeat.model_validate(_beat()), b"surprise"))
        writer.write(frame(Ping(sender="mallory", sent_at=5.0)))
        await writer.drain()
        await until(lambda: target.node.got, "the ping after it")
        assert target.rejected("oversize") == 1
        assert [m.type for m in target.node.messages_from("mallory")] == ["ping"]
        writer.close()
        await close_all(target.node)

    asyncio.run(scenario())


def test_an_idle_connection_is_closed_after_the_idle_timeout() -> None:
    async def scenario() -> None:
        target = await receiver(idle_timeout_s=0.2)
        reader, writer = await attacker(target)
        writer.write(frame(Ping(sender="mallory", sent_at=1.0)))
        await writer.drain()
        assert await closed_by_peer(reader)
        assert target.node.gone == [("mallory", False)]
        assert len(target.node.got) == 1
        await _honest_peer_is_served(target)
        await close_all(target.node)

    asyncio.run(scenario())


def test_a_frame_that_stops_halfway_is_closed_after_the_idle_timeout() -> None:
    async def scenario() -> None:
        target = await receiver(idle_timeout_s=0.2)
        reader, writer = await attacker(target)
        chunk = Chunk(sender="m", epoch=0, step=0, phase="up", index=0, count=1)
        half = frame(chunk, bytes(1 << 20))[: 1 << 19]
        writer.write(half)
        await writer.drain()
        assert await closed_by_peer(reader)
        assert target.node.got == []
        await close_all(target.node)

    asyncio.run(scenario())


def test_a_connection_without_hello_is_closed_after_the_handshake_timeout() -> None:
    async def scenario() -> None:
        target = await receiver(handshake_timeout_s=0.2)
        reader, _ = await attacker(target, hello=None)
        assert await closed_by_peer(reader)
        assert target.node.gone == []
        await _honest_peer_is_served(target)
        await close_all(target.node)

    asyncio.run(scenario())
