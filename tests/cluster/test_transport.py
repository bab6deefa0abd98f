"""TcpTransport over real loopback sockets, beyond the shared contract
(tests/unit/test_transport_contract.py): big payloads written in pieces, mid-sized ones
written as they are after their header, a killed peer process.

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

import pytest

from tests.transportkit import chunk, close_all, start, until

pytestmark = pytest.mark.cluster


def test_32_mb_payload_arrives_intact_between_small_frames() -> None:
    async def scenario() -> None:
        a, b = await start("a"), await start("b")
        a.transport.connect("b", b.address)
        big = random.Random(1).randbytes(32 << 20)
        floats = array.array("d", range(1 << 20))  # 8 MiB, memoryview format "d"
        mid = random.Random(2).randbytes(300 << 10)  # over JOIN_BYTES, under a piece
        mid_floats = array.array("d", range(1 << 14))  # 128 KiB, format "d"
        payloads = [b"before", big, memoryview(floats), mid, memoryview(mid_floats), b"after"]
        for index, payload in enumerate(payloads):
            assert a.transport.send("b", chunk("a", index), payload)
        await until(lambda: len(b.got) == len(payloads), "every frame at b")
        assert [m.index for m in b.messages_from("a")] == list(range(len(payloads)))
        before, got_big, got_floats, got_mid, got_mid_floats, after = b.payloads_from("a")
        assert (before, after) == (b"before", b"after")
        assert len(got_big) == len(big)
        assert hashlib.sha256(got_big).hexdigest() == hashlib.sha256(big).hexdigest()
        assert got_floats == floats.tobytes()
        assert got_mid == mid
        assert got_mid_floats == mid_floats.tobytes()
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
