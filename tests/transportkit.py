"""Transport test helpers: a recording node, a bounded wait, a chunk builder."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from chaos_worker.net.bounds import Guard, Limits
from chaos_worker.net.shaping import LinkShape
from chaos_worker.net.transport import TcpTransport, Transport, TransportFactory
from chaos_worker.net.wire import Chunk, Message

DEADLINE_S = 30.0


@dataclass
class Node:
    """A listening transport that records what it delivers."""

    name: str
    transport: Transport = field(repr=False)
    address: str = ""
    got: list[tuple[str, Message, bytes]] = field(default_factory=list)
    gone: list[tuple[str, bool]] = field(default_factory=list)

    def payloads_from(self, sender: str) -> list[bytes]:
        return [payload for who, _, payload in self.got if who == sender]

    def messages_from(self, sender: str) -> list[Message]:
        return [message for who, message, _ in self.got if who == sender]


async def start(
    name: str,
    *,
    max_payload: int = 1 << 30,
    factory: TransportFactory = TcpTransport,
    shape: Callable[[str], LinkShape] | None = None,
) -> Node:
    got: list[tuple[str, Message, bytes]] = []
    gone: list[tuple[str, bool]] = []
    transport = factory(
        name,
        lambda sender, message, payload: got.append((sender, message, payload)),
        lambda peer, graceful: gone.append((peer, graceful)),
        max_payload=max_payload,
        shape=shape,
    )
    # the kit's frames are chunks of any size: each type may carry up to `max_payload`
    transport.guard = Guard(Limits(chunk_bytes=max_payload, state_bytes=max_payload))
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


def chunk(sender: str, index: int, *, count: int = 1 << 20) -> Chunk:
    return Chunk(sender=sender, epoch=0, step=0, phase="up", index=index, count=count)


async def close_all(*nodes: Node) -> None:
    for node in nodes:
        await node.transport.close()
