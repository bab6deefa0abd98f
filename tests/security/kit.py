"""Hostile-peer helpers: a guarded receiver with a real metrics counter, raw frames, EOF."""

from __future__ import annotations

import asyncio
import json

from chaos_worker.net.bounds import Guard, Limits, Rejections
from chaos_worker.net.wire import FRAME, Hello, WireMessage, encode
from chaos_worker.telemetry.metrics import WorkerMetrics

from tests.transportkit import DEADLINE_S, Node, start


class Receiver:
    """A listening `TcpTransport` guarded as a member's is, counting into its metrics."""

    def __init__(self, node: Node, metrics: WorkerMetrics) -> None:
        self.node = node
        self.metrics = metrics

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.node.address.rpartition(":")
        return host, int(port)

    def rejected(self, reason: str) -> float:
        """`chaos_rejected_messages_total{reason}` as a scrape would read it."""
        value = self.metrics.registry.get_sample_value(
            "chaos_rejected_messages_total", {"reason": reason}
        )
        return value or 0.0


async def receiver(name: str = "w0", **limits: float) -> Receiver:
    """A receiver whose `Limits` are the defaults but for `limits`."""
    metrics = WorkerMetrics(name)
    bounds = Limits(**limits)
    node = await start(name, max_payload=bounds.largest)
    node.transport.guard = Guard(bounds, Rejections(metrics.observe_rejected))
    return Receiver(node, metrics)


def frame(message: WireMessage, payload: bytes = b"") -> bytes:
    return b"".join(bytes(part) for part in encode(message, payload))


def raw_frame(header: dict | str, payload: bytes = b"") -> bytes:
    """A frame of a header written by hand (JSON text, or a dict dumped allowing NaN)."""
    text = header if isinstance(header, str) else json.dumps(header)
    data = text.encode()
    return FRAME.pack(len(data), len(payload)) + data + payload


async def attacker(target: Receiver, *, hello: str | None = "mallory"):
    """A raw connection to `target`, having said `Hello` as `hello` (None: not at all)."""
    reader, writer = await asyncio.open_connection(*target.host_port)
    if hello is not None:
        writer.write(frame(Hello(sender=hello)))
        await writer.drain()
    return reader, writer


async def closed_by_peer(reader: asyncio.StreamReader) -> bool:
    """Whether the other end closes the connection (reads to EOF or a reset); a generous
    deadline only turns a hang into a failure."""
    try:
        while await asyncio.wait_for(reader.read(1 << 16), DEADLINE_S):
            pass
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    return True
