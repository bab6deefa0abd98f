"""Point-to-point transport between workers: the `Transport` contract and its TCP form.

`Transport` is what the member, the replicator, the puller and the probe need of a link
layer; they take a `TransportFactory` (default `TcpTransport`) so that another
implementation (`chaos_worker.net.loop.LoopTransport`, in memory) can stand in. The contract,
checked for both by `tests/unit/test_transport_contract.py`:

- frames from one sender reach a receiver in the order they were sent (FIFO per peer), each
  payload as a read-only buffer of the receiver's own (`receiver.Payload`: `bytes`, or a
  read-only memoryview), which nothing may change, or of the one its owner's `place` named;
- `disconnect(peer, goodbye=True)` delivers everything queued, then the receiver's
  `on_disconnect(sender, True)`; a link that ends otherwise reports `graceful=False`;
- a blocked link sends nothing and delivers nothing, in both directions, and reports no
  disconnect;
- a frame whose payload is over the receiver's `max_payload` is never delivered: the receiver
  drops the link (`on_disconnect(sender, False)`);
- a message that is invalid, or whose payload is over what its type may carry
  (`guard.limits`), is never delivered either, but only it is dropped: the link goes on
  (`chaos_worker.net.bounds`);
- an outgoing link that breaks is opened again and goes on with the frames still queued
  (those in flight are lost; the receiver saw `on_disconnect(sender, False)`);
- `reachable(address)` tells a dead peer (nothing accepts there: False) from a live one
  (True) or one that does not answer in time (None).

`TcpTransport`: one outgoing connection per peer carries this worker's frames to it in FIFO
order (the membership protocol relies on that order); incoming connections deliver the peer's
frames to `on_message` in arrival order, read by `chaos_worker.net.receiver` straight into
the buffer each payload is handed on in. Links can be blocked to emulate a link going down: a
blocked link neither sends nor accepts frames. Outgoing links may be shaped (rate and added
delay, see `chaos_worker.net.shaping`) and incoming bytes may share one downlink bucket.

With `tls` (`chaos_worker.net.tls`) every connection begins with a mutual TLS 1.3 handshake
and then carries its frames sealed under a key that handshake protected
(`chaos_worker.net.sealed`): an incoming peer is the member its certificate names (a Hello
that claims another id is refused), and an outgoing link carries frames only once the
server's certificate names the peer it is for. A listener runs each accepted connection's
handshake itself, so that a handshake it refuses is counted (`LinkTls.refusals`), as are
the refusals of either direction's names.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from chaos_worker.net import sealed
from chaos_worker.net.address import parse_address
from chaos_worker.net.bounds import Guard
from chaos_worker.net.receiver import FrameStream, IncomingLink, Payload, Place, read_frame
from chaos_worker.net.shaping import PIECE, LinkShape, TokenBucket
from chaos_worker.net.tls import HANDSHAKE_TIMEOUT_S, LinkTls, names
from chaos_worker.net.wire import Goodbye, Hello, Message, WireError, WireMessage, encode

log = logging.getLogger(__name__)

OnMessage = Callable[[str, Message, Payload], None]
OnDisconnect = Callable[[str, bool], None]


class Transport(Protocol):
    """Frames to and from named peers (see the module docstring for the contract)."""

    me: str
    guard: Guard
    """What it lets in from peers (limits, timeouts) and the count of what it refused; its
    owner may replace it before listening."""
    place: Place | None
    """Where its owner wants admitted payloads read (`receiver.Place`); a transport may
    ignore it and hand on buffers of its own."""

    async def listen(self, host: str, port: int) -> int:
        """Start accepting links; the bound port (useful with port 0)."""
        ...

    def connect(self, peer: str, address: str) -> None:
        """Make sure an outgoing link to `peer` at `address` exists (idempotent)."""
        ...

    def disconnect(self, peer: str, *, goodbye: bool = False) -> None:
        """Drop the outgoing link to `peer`, optionally after a goodbye."""
        ...

    def send(self, peer: str, message: WireMessage, payload: bytes | memoryview = b"") -> bool:
        """Queue one frame for `peer`; False when there is no usable link."""
        ...

    def peers(self) -> list[str]:
        """Peers with an outgoing link."""
        ...

    def block(self, peer: str) -> None:
        """Emulate the link to `peer` going down, both directions."""
        ...

    def unblock(self, peer: str) -> None: ...

    def is_blocked(self, peer: str) -> bool: ...

    async def reachable(self, address: str, timeout: float) -> bool | None:
        """Whether something accepts links at `address`: False when refused, None when
        there is no answer within `timeout` seconds."""
        ...

    async def close(self) -> None:
        """Say goodbye on every link, flush, and stop."""
        ...


TransportFactory = Callable[..., Transport]
"""Builds a `Transport`, called as `TcpTransport` is: `(me, on_message, on_disconnect, *,
max_payload, shape=None, downlink=None)` (TLS is bound beforehand: `TcpTransport.secured`)."""


LINGER_S = 0.05
"""How long `TcpTransport.reachable` watches an accepted connection for a reset."""


JOIN_BYTES = 1 << 16
"""Frames whose payload is smaller (and within a piece) are joined into one write, one
syscall; a larger payload is written as it is, after its prefix and header."""


async def _write_frame(
    writer: asyncio.StreamWriter, frame: list[bytes | memoryview], bucket: TokenBucket | None
) -> None:
    """Write one encoded frame: a small one in one joined write; a larger one as its prefix
    and header, then its payload a piece at a time, never copied (Python 3.11's
    `writelines` joins what it is given into one new `bytes`).

    With a `bucket`, every write waits for its tokens first (shaped link).
    """
    prefix, header, payload = frame
    view = memoryview(payload)
    piece = PIECE if bucket is None else bucket.piece
    if view.nbytes < JOIN_BYTES and view.nbytes <= piece:
        if bucket is not None:
            await bucket.consume(len(prefix) + len(header) + view.nbytes)
        writer.writelines(frame)
        return
    view = view.cast("B")
    if bucket is not None:
        await bucket.consume(len(prefix) + len(header))
    writer.write(bytes(prefix) + bytes(header))
    for start in range(0, view.nbytes, piece):
        chunk = view[start : start + piece]
        if bucket is not None:
            await bucket.consume(chunk.nbytes)
        writer.write(chunk)
        await writer.drain()


@dataclass
class OutgoingLink:
    """One outgoing link: its frames in FIFO order, each with the time it may leave."""

    address: str
    shape: LinkShape = field(default_factory=LinkShape)
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    task: asyncio.Task | None = None
    sent_bytes: int = 0
    bucket: TokenBucket | None = None

    def __post_init__(self) -> None:
        if self.shape.rate_bytes_per_s is not None:
            self.bucket = TokenBucket(self.shape.rate_bytes_per_s)

    def put(self, frame: list[bytes | memoryview] | None) -> None:
        """Queue a frame (None closes the link) with the time it may leave."""
        self.queue.put_nowait((time.monotonic() + self.shape.delay_s, frame))


class QueuedTransport:
    """What every transport keeps of its links: one FIFO queue and pump task per outgoing
    link, the blocked peers, goodbyes. Subclasses move the frames (`_pump`) and own the
    incoming side (`_drop_incoming`, `_stop`)."""

    def __init__(
        self,
        me: str,
        on_message: OnMessage,
        on_disconnect: OnDisconnect,
        max_payload: int,
        shape: Callable[[str], LinkShape] | None,
    ) -> None:
        self.me = me
        self._shape = shape or (lambda _peer: LinkShape())
        self._on_message = on_message
        self._on_disconnect = on_disconnect
        self._max_payload = max_payload
        self.guard = Guard()
        self.place: Place | None = None
        """Where admitted payloads are read, if not to buffers of their own (`Place`; only
        `TcpTransport` reads payloads from sockets and asks)."""
        self._out: dict[str, OutgoingLink] = {}
        self._draining: set[asyncio.Task] = set()  # links dropped with a goodbye, flushing
        self._blocked: set[str] = set()
        self._closing = False

    def connect(self, peer: str, address: str) -> None:
        """Make sure an outgoing link to `peer` exists (idempotent)."""
        out = self._out.get(peer)
        if out is not None and out.address == address and out.task and not out.task.done():
            return
        if out is not None and out.task:
            out.task.cancel()
        out = OutgoingLink(address, self._shape(peer))
        out.task = asyncio.get_running_loop().create_task(self._pump(peer, out))
        self._out[peer] = out

    def disconnect(self, peer: str, *, goodbye: bool = False) -> None:
        """Drop the outgoing link to `peer`, optionally after a goodbye frame."""
        out = self._out.pop(peer, None)
        if out is None or out.task is None:
            return
        if goodbye:
            out.put(encode(Goodbye(sender=self.me)))
            out.put(None)
            self._draining.add(out.task)
            out.task.add_done_callback(self._draining.discard)
        else:
            out.task.cancel()

    def send(self, peer: str, message: WireMessage, payload: bytes | memoryview = b"") -> bool:
        """Queue one frame for `peer`; False when there is no usable link.

        The payload is not copied: leave it unchanged until the frame has been written.
        """
        out = self._out.get(peer)
        if out is None or peer in self._blocked:
            return False
        out.put(encode(message, payload))
        return True

    def peers(self) -> list[str]:
        """Peers with an outgoing link."""
        return sorted(self._out)

    def block(self, peer: str) -> None:
        """Emulate the link to `peer` going down: close both directions, refuse frames.

        A goodbye goes first so that the peer does not take the closed link for a crash.
        """
        self.disconnect(peer, goodbye=True)
        self._blocked.add(peer)
        self._drop_incoming(peer)

    def unblock(self, peer: str) -> None:
        self._blocked.discard(peer)

    def is_blocked(self, peer: str) -> bool:
        return peer in self._blocked

    async def close(self) -> None:
        """Say goodbye on every link, flush, and stop."""
        self._closing = True
        # every pump still flushing is awaited (a leaver's last totals down the tree, its
        # goodbyes), also those of links dropped before, as a leaver's new view drops all
        for peer in list(self._out):
            self.disconnect(peer, goodbye=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*self._draining, return_exceptions=True), 1.0)
        await self._stop()

    def _report_disconnect(self, peer: str, graceful: bool) -> None:
        """Tell `on_disconnect` that `peer`'s incoming link ended, unless we closed or
        blocked it."""
        if self._closing or peer in self._blocked:
            return
        try:
            self._on_disconnect(peer, graceful)
        except Exception:
            log.exception("handling the disconnect of %s failed", peer)

    async def _pump(self, peer: str, out: OutgoingLink) -> None:
        raise NotImplementedError

    def _drop_incoming(self, peer: str) -> None:
        raise NotImplementedError

    async def _stop(self) -> None:
        raise NotImplementedError


class TcpTransport(QueuedTransport):
    """Frames to and from named peers over TCP; see the module docstring."""

    def __init__(
        self,
        me: str,
        on_message: OnMessage,
        on_disconnect: OnDisconnect,
        *,
        max_payload: int,
        shape: Callable[[str], LinkShape] | None = None,
        downlink: TokenBucket | None = None,
        tls: LinkTls | None = None,
    ) -> None:
        super().__init__(me, on_message, on_disconnect, max_payload, shape)
        self._downlink = downlink
        self._tls = tls
        self._warned: set[tuple[str, str]] = set()  # (peer, what): refusals logged once
        self._in: dict[str, set[IncomingLink]] = {}  # a sender may have several
        self._server: asyncio.Server | None = None

    @classmethod
    def secured(cls, tls: LinkTls | None) -> TransportFactory:
        """A `TransportFactory` of TcpTransports with `tls` (None: plaintext)."""
        return functools.partial(cls, tls=tls)

    async def listen(self, host: str, port: int) -> int:
        """Start accepting connections; returns the bound port (useful with port 0)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: IncomingLink(self._serve), host, port, reuse_address=True
        )
        return self._server.sockets[0].getsockname()[1]

    def _drop_incoming(self, peer: str) -> None:
        for link in self._in.pop(peer, ()):
            link.close()

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for links in self._in.values():
            for link in links:
                link.close()

    async def reachable(self, address: str, timeout: float) -> bool | None:
        """A connection that is accepted and then stays open for `LINGER_S` shows a live
        peer: a process being killed may still accept, then resets at once."""
        host, port = parse_address(address)
        try:
            connecting = asyncio.open_connection(host, port)
            reader, writer = await asyncio.wait_for(connecting, timeout)
        except TimeoutError:
            return None
        except ConnectionRefusedError:
            return False
        except OSError:
            return None
        try:
            if self._tls is not None:  # a handshake that hangs: accepted and open, as below
                await asyncio.wait_for(writer.start_tls(self._tls.client), timeout)
            closed = await asyncio.wait_for(reader.read(1), LINGER_S) == b""
        except TimeoutError:
            closed = False
        except OSError as exc:
            if self._tls is not None:
                self._tls.failed(address, exc)
            closed = True
        finally:
            writer.close()
        return not closed

    async def _pump(self, peer: str, out: OutgoingLink) -> None:
        """Open the link (retrying until the peer listens), then write the queued frames
        in order; when the link breaks, open it again and go on with the queue."""
        host, port = parse_address(out.address)
        while True:
            writer = await self._open_to(peer, host, port)
            try:
                writer.writelines(encode(Hello(sender=self.me)))
                while True:
                    due, frame = await out.queue.get()
                    if frame is None:
                        await writer.drain()
                        return
                    wait = due - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    if writer.is_closing():  # the peer reset it: writes would go nowhere
                        raise ConnectionResetError("the connection was closed")
                    await _write_frame(writer, frame, out.bucket)
                    out.sent_bytes += sum(memoryview(b).nbytes for b in frame)
                    if out.queue.empty():
                        await writer.drain()
            except (OSError, asyncio.IncompleteReadError, ConnectionError) as exc:
                log.info("link to %s broke (%s); opening it again", peer, exc)
            finally:
                writer.close()

    async def _open_to(self, peer: str, host: str, port: int) -> asyncio.StreamWriter:
        """`_open`'s connection; with TLS, sealed (`sealed.connect`) and retried (backing
        off to 0.5 s) until the handshake succeeds and the server's certificate names
        `peer` (see `tls.names`)."""
        delay = 0.01
        while True:
            reader, writer = await _open(host, port)
            if self._tls is None:
                return writer
            tls = self._tls
            try:
                connecting = sealed.connect(reader, writer, tls.client)
                client = await asyncio.wait_for(connecting, HANDSHAKE_TIMEOUT_S)
                server = tls.peer(client.server)
                if names(peer, server):
                    return client.seal()
                tls.refusals(peer, "bad_name", f"the server for {peer} is {server}")
            except ssl.SSLError as exc:  # verification failed, one way or the other
                if not self._tls.failed(peer, exc):  # the server refused ours (it counts that)
                    self._warn_once(peer, "handshake", "TLS to %s failed: %s", peer, exc)
            except (OSError, asyncio.IncompleteReadError):  # reset, closed or timed out
                pass  # during the handshake: as a failed connect
            writer.close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    def _authentic(self, claimed: str, link: FrameStream) -> bool:
        """Whether an incoming peer that says Hello as `claimed` is that member: always
        without TLS; with it, only if its certificate names `claimed`."""
        if self._tls is None:
            return True
        holder = self._tls.peer(link.get_extra_info("ssl_object"))
        if holder is not None and holder.member == claimed:
            return True
        self._tls.refusals(claimed, "bad_name", f"a Hello as {claimed} from {holder}")
        return False

    def _warn_once(self, peer: str, what: str, text: str, *args: object) -> None:
        if (peer, what) not in self._warned:
            self._warned.add((peer, what))
            log.warning(text, *args)

    async def _serve(self, link: IncomingLink) -> None:
        sock = link.get_extra_info("socket")
        if isinstance(sock, socket.socket):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sender = None
        graceful = False
        try:
            stream: FrameStream = link if self._tls is None else await self._accept_tls(link)
            first, _ = await self._read_frame(stream)
            if not isinstance(first, Hello) or first.sender in self._blocked:
                return
            if not self._authentic(first.sender, stream):
                return
            sender = first.sender
            self._in.setdefault(sender, set()).add(link)
            while True:
                message, payload = await self._read_frame(stream, sender)
                if sender in self._blocked:
                    return
                if message is None:  # refused alone (counted): the link goes on
                    continue
                if isinstance(message, Goodbye):
                    graceful = True
                    continue
                try:
                    self._on_message(sender, message, payload)
                except Exception:
                    log.exception("handling %s from %s failed", message.type, sender)
        except (asyncio.IncompleteReadError, ConnectionError, OSError, asyncio.CancelledError):
            pass
        except WireError as exc:  # framing lost, or no valid Hello: the connection goes
            peer = sender or _host_of(link)
            self.guard.rejections(peer, exc.reason, f"dropping the connection: {exc}")
        finally:
            link.close()
            if sender is not None and link in self._in.get(sender, ()):
                self._in[sender].discard(link)
                self._report_disconnect(sender, graceful)

    async def _accept_tls(self, link: IncomingLink) -> sealed.OpenedLink:
        """The server's half of an incoming connection's handshake, and the link's frames
        read through its records (`sealed.accept`); a refusal is counted
        (`LinkTls.failed`) and raises, as a peer that went away does."""
        assert self._tls is not None
        try:
            return await sealed.accept(link, self._tls.server, HANDSHAKE_TIMEOUT_S)
        except ssl.SSLError as exc:
            self._tls.failed(_host_of(link, "before its handshake"), exc)
            raise

    async def _read_frame(
        self, link: FrameStream, sender: str | None = None
    ) -> tuple[Message | None, Payload]:
        """`receiver.read_frame` with this transport's guard, hard limit, downlink and place."""
        return await read_frame(
            link, self.guard, self._max_payload, self._downlink, sender, self.place
        )


async def _open(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to `host:port`, retried (backing off to 0.5 s) until it is accepted."""
    delay = 0.01
    while True:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)
            continue
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return reader, writer


def _host_of(link: IncomingLink, when: str = "before hello") -> str:
    """The remote host of a connection that has not named itself (logged once per host)."""
    peer = link.get_extra_info("peername")
    return f"{peer[0]} ({when})" if isinstance(peer, tuple) else f"unknown peer ({when})"
