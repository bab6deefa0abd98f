"""An in-memory `Transport`: members in one event loop, linked without sockets.

`LoopNetwork` maps listening addresses to transports; `LoopNetwork.factory()` is a
`TransportFactory`. Frames still go through the wire codec (`encode`, then the receiver's
`parse_lengths` with its own `max_payload`, and its `guard`), so the bounds and the
validation are those of `TcpTransport`; only the bytes never leave the process (and there
is no handshake or idle connection to time out). Each outgoing
link is a queue drained by one task, which keeps FIFO order per peer and applies a link
shape's added delay (not its rate). It keeps the contract in `chaos_worker.net.transport`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from chaos_worker.net.shaping import LinkShape, TokenBucket
from chaos_worker.net.transport import (
    OnDisconnect,
    OnMessage,
    OutgoingLink,
    QueuedTransport,
    Transport,
    TransportFactory,
)
from chaos_worker.net.wire import FRAME, FrameError, Goodbye, parse_lengths

log = logging.getLogger(__name__)

Frame = list[bytes | memoryview]


class LoopNetwork:
    """Listening addresses of the `LoopTransport`s of one event loop."""

    def __init__(self) -> None:
        self.listening: dict[str, LoopTransport] = {}
        self._ports = itertools.count(1)

    def port(self) -> int:
        """A port no transport of this network has taken."""
        return next(self._ports)

    def factory(self) -> TransportFactory:
        """A `TransportFactory` whose transports live on this network."""

        def build(
            me: str,
            on_message: OnMessage,
            on_disconnect: OnDisconnect,
            *,
            max_payload: int,
            shape: Callable[[str], LinkShape] | None = None,
            downlink: TokenBucket | None = None,
        ) -> Transport:
            del downlink  # an in-memory link has no downlink to shape
            return LoopTransport(self, me, on_message, on_disconnect, max_payload, shape)

        return build


@dataclass(eq=False)
class _Link:
    """One open link from `sender` into a receiving transport."""

    sender: str
    open: bool = True
    graceful: bool = False


class LoopTransport(QueuedTransport):
    """Frames to and from named peers of one `LoopNetwork`; see the module docstring."""

    def __init__(
        self,
        network: LoopNetwork,
        me: str,
        on_message: OnMessage,
        on_disconnect: OnDisconnect,
        max_payload: int,
        shape: Callable[[str], LinkShape] | None = None,
    ) -> None:
        super().__init__(me, on_message, on_disconnect, max_payload, shape)
        self._network = network
        self._in: dict[str, set[_Link]] = {}  # a sender may have several
        self._address: str | None = None

    async def listen(self, host: str, port: int) -> int:
        port = port or self._network.port()
        self._address = f"{host}:{port}"
        self._network.listening[self._address] = self
        return port

    def _drop_incoming(self, peer: str) -> None:
        for link in self._in.pop(peer, ()):
            link.open = False

    async def _stop(self) -> None:
        if self._network.listening.get(self._address or "") is self:
            del self._network.listening[self._address or ""]
        for links in self._in.values():
            for link in links:
                link.open = False
        self._in.clear()

    async def reachable(self, address: str, timeout: float) -> bool | None:
        del timeout  # a listener of this network answers at once
        return address in self._network.listening

    async def _pump(self, peer: str, out: OutgoingLink) -> None:
        """Open the link (waiting for a listener, as TCP retries), then deliver in order."""
        delay = 0.01
        while (receiver := self._network.listening.get(out.address)) is None:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)
        link = receiver._accept(self.me)
        try:
            while True:
                due, frame = await out.queue.get()
                if frame is None:
                    break
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                receiver._deliver(link, frame)
        finally:
            receiver._end(link)

    def _accept(self, sender: str) -> _Link:
        """A new link from `sender` (next to any others of its); refused (closed) if blocked."""
        link = _Link(sender, open=sender not in self._blocked and not self._closing)
        if link.open:
            self._in.setdefault(sender, set()).add(link)
        return link

    def _deliver(self, link: _Link, frame: Frame) -> None:
        """Decode one frame as the TCP reader would: one over `max_payload` drops the link,
        an invalid message only itself."""
        if not link.open:
            return
        if link.sender in self._blocked:
            link.open = False
            return
        data = b"".join(bytes(part) for part in frame)
        try:
            header_len, payload_len = parse_lengths(data[: FRAME.size], self._max_payload)
        except FrameError as exc:
            self.guard.rejections(link.sender, exc.reason, f"dropping the link: {exc}")
            self._end(link)
            return
        header_end = FRAME.size + header_len
        message = self.guard.admit(link.sender, data[FRAME.size : header_end], payload_len)
        if message is None:  # refused alone (counted): the link goes on
            return
        if isinstance(message, Goodbye):
            link.graceful = True
            return
        try:
            self._on_message(link.sender, message, data[header_end : header_end + payload_len])
        except Exception:
            log.exception("handling %s from %s failed", message.type, link.sender)

    def _end(self, link: _Link) -> None:
        """The link closed: tell `on_disconnect` unless it was dropped, blocked or closing."""
        was_open, link.open = link.open, False
        if not was_open or link not in self._in.get(link.sender, ()):
            return
        self._in[link.sender].discard(link)
        self._report_disconnect(link.sender, link.graceful)
