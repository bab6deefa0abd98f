"""The accepting side of a link: frames read straight into the buffers they end in.

A `TcpTransport` listener gives each accepted connection an `IncomingLink`, an
`asyncio.BufferedProtocol`: the socket (`recv_into`) writes into the buffer that
`get_buffer` hands out. Under TLS the link's frames are read through its records
(`sealed.OpenedLink`, a `FrameStream` too), each decrypted into the buffer a read names.
Prefixes, headers and small payloads go through a small internal buffer (`BUFFER_BYTES`);
an admitted payload goes into one buffer of exactly its size, allocated only once
`read_frame` has checked its length and admitted its message (or one its receiver names
for it: `Place`), and is handed on as a read-only memoryview of it (no `bytes` is built,
no piece is joined). A refused payload is read to nothing through the internal buffer.
When no read is waiting and the internal buffer is full, the link pauses reading: a peer
can make it hold no more than that buffer and the frame being read (`docs/security.md`,
"Bounded everything").
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Protocol

import numpy as np

from chaos_worker.net.bounds import HELLO_HEADER_BYTES, Guard
from chaos_worker.net.shaping import TokenBucket
from chaos_worker.net.wire import (
    FRAME,
    MAX_HEADER_BYTES,
    FrameError,
    Message,
    decode_header,
    parse_lengths,
)

log = logging.getLogger(__name__)

Payload = bytes | memoryview
"""What a receiver hands on: `b""`, or a read-only view of a buffer of its own."""
Place = Callable[[str, Message, int], memoryview | None]
"""Where the receiver wants the payload of an admitted message from a sender read:
`place(sender, message, nbytes)` gives a writable buffer of exactly `nbytes`, or None for
a new one (the collective reads a total straight into its result)."""

BUFFER_BYTES = 1 << 16
"""The internal buffer: prefixes, headers, small payloads, and the read-ahead of a link.
Before its first frame (the `Hello`) a link has one of that frame's largest size only."""
_FIRST_BYTES = FRAME.size + HELLO_HEADER_BYTES
_DIRECT_BYTES = 1 << 14
"""Reads of at least this many bytes go straight into their buffer; smaller ones are
copied out of the internal buffer (one `recv` serves many small frames)."""


class FrameStream(Protocol):
    """The bytes of one incoming link as `read_frame` reads them."""

    async def read(self, size: int, timeout: float) -> bytes | bytearray: ...

    async def readinto(
        self, view: memoryview | None, timeout: float, *, size: int = 0, idle: bool = False
    ) -> None: ...

    def widen(self) -> None: ...

    def get_extra_info(self, name: str, default: object = None) -> object: ...


class IncomingLink(asyncio.BufferedProtocol):
    """One accepted connection: its bytes, read on demand by the task `serve` runs for it.

    `get_extra_info`, `transport` and `close` stand for the connection as a `StreamWriter`'s
    do; `received` counts the bytes read off it (after TLS).
    """

    def __init__(self, serve: Callable[[IncomingLink], Coroutine[object, object, None]]) -> None:
        self._serve = serve
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.BaseTransport | None = None
        self.task: asyncio.Task[None] | None = None
        self.received = 0
        self._buffer = memoryview(bytearray(_FIRST_BYTES))
        self._start = self._end = 0  # what is buffered and not read yet
        self._target: memoryview | None = None  # a read that wants its bytes straight in
        self._filled = 0
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._since = 0.0  # the last bytes, or the start of the read waiting for them
        self._ended = False
        self._error: BaseException | None = None
        self._paused = False

    # -- the protocol: called by the event loop -------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self._pause()  # until a read waits
        self.task = self._loop.create_task(self._serve(self))
        self.task.add_done_callback(self._served)

    def _served(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("serving an incoming link failed", exc_info=task.exception())
        self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended, self._error = True, exc
        self._wake()

    def eof_received(self) -> bool:
        self._ended = True
        self._wake()
        return False  # the transport closes itself

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._target is not None:
            return self._target[self._filled :]
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == len(self._buffer):  # never full here: a full buffer pauses
            held = self._end - self._start
            self._buffer[:held] = self._buffer[self._start : self._end]
            self._start, self._end = 0, held
        return self._buffer[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        self.received += nbytes
        self._since = self._loop.time()
        if self._target is not None:
            self._filled += nbytes
            if self._filled == len(self._target):
                self._target = None
                self._wake()
            return
        self._end += nbytes
        if self._end - self._start == len(self._buffer):
            self._pause()
        self._wake()

    # -- the connection, as the serving task sees it --------------------------------------

    def get_extra_info(self, name: str, default: object = None) -> object:
        assert self.transport is not None
        return self.transport.get_extra_info(name, default)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def widen(self) -> None:
        """The first frame is read: from now on, the full internal buffer."""
        held = self._end - self._start
        buffer = memoryview(bytearray(BUFFER_BYTES))
        buffer[:held] = self._buffer[self._start : self._end]
        self._buffer, self._start, self._end = buffer, 0, held

    async def read(self, size: int, timeout: float) -> bytes | bytearray:
        """Exactly `size` bytes (a prefix, a header), all of them within `timeout`."""
        if self._end - self._start >= size:  # the common case: already here
            data = bytes(self._buffer[self._start : self._start + size])
            self._start += size
            return data
        into = bytearray(size)
        await self.readinto(memoryview(into), timeout)
        return into

    async def readinto(
        self, view: memoryview | None, timeout: float, *, size: int = 0, idle: bool = False
    ) -> None:
        """Fill `view` exactly (None: read `size` bytes to nothing), within `timeout`; with
        `idle`, the time runs from the last bytes that came, not from the start."""
        size = len(view) if view is not None else size
        got = 0
        self._since = self._loop.time()
        deadline = self._since + timeout
        while True:
            take = min(size - got, self._end - self._start)
            if take and view is not None:
                view[got : got + take] = self._buffer[self._start : self._start + take]
            self._start += take
            got += take
            if got == size:
                return
            if self._ended:
                raise self._error or asyncio.IncompleteReadError(b"", size)
            direct = view is not None and size - got >= _DIRECT_BYTES
            if direct:  # the buffer is empty: the rest goes straight in
                self._target, self._filled = view[got:], 0
            try:
                await self._wait(deadline, timeout if idle else 0.0)
            finally:
                if direct:
                    got += self._filled
                    self._target, self._filled = None, 0

    async def _wait(self, deadline: float, idle: float) -> None:
        """Until bytes arrive (or the direct read is full), the link ends, or time is up."""
        self._waiter = waiter = self._loop.create_future()
        self._resume()
        self._timer = self._loop.call_at(deadline, self._expire, deadline, idle)
        try:
            await waiter
        finally:
            self._waiter = None
            self._timer.cancel()

    def _expire(self, deadline: float, idle: float) -> None:
        if self._waiter is None or self._waiter.done():
            return
        if idle:  # any bytes since restart the wait
            deadline = self._since + idle
            if deadline > self._loop.time():
                self._timer = self._loop.call_at(deadline, self._expire, deadline, idle)
                return
        self._waiter.set_exception(TimeoutError())

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done() and (self._target is None or self._ended):
            waiter.set_result(None)

    def _pause(self) -> None:
        if not self._paused and isinstance(self.transport, asyncio.ReadTransport):
            self._paused = True
            self.transport.pause_reading()

    def _resume(self) -> None:
        if self._paused and isinstance(self.transport, asyncio.ReadTransport):
            self._paused = False
            self.transport.resume_reading()


async def read_frame(
    link: FrameStream,
    guard: Guard,
    max_payload: int,
    downlink: TokenBucket | None,
    sender: str | None = None,
    place: Place | None = None,
) -> tuple[Message | None, Payload]:
    """The next frame of `link`; its message is None when refused alone (its payload read to
    nothing, never held). Without `sender` it is the first frame: small, no payload, within
    the handshake timeout, and any fault raises. Lengths are checked, and the message
    admitted by `guard`, before anything of their size is allocated.

    With a `downlink` (the receiver's shaped downlink), the prefix and header, then each
    piece of the payload, wait for their tokens. With `place`, an admitted payload is read
    where it says (see `Place`).
    """
    limits = guard.limits
    first = sender is None
    timeout = limits.handshake_timeout_s if first else limits.idle_timeout_s
    try:
        prefix = await link.read(FRAME.size, timeout)
    except TimeoutError:
        what = "no hello" if first else "nothing"
        log.info("closing the link from %s: %s for %g s", sender, what, timeout)
        raise
    header_len, payload_len = parse_lengths(
        prefix, 0 if first else max_payload, HELLO_HEADER_BYTES if first else MAX_HEADER_BYTES
    )
    header = await link.read(header_len, timeout)
    if downlink is not None:
        await downlink.consume(FRAME.size + header_len)
    if first:
        message = decode_header(header)
        link.widen()
        return message, b""
    message = guard.admit(sender, header, payload_len)
    if not payload_len:
        return message, b""
    into = None if message is None or place is None else place(sender, message, payload_len)
    if message is not None and into is None:
        try:
            into = memoryview(np.empty(payload_len, np.uint8))  # not touched: committed as read
        except MemoryError:
            detail = f"no memory for a payload of {payload_len} bytes"
            raise FrameError(detail, "oversize") from None
    step = payload_len if downlink is None else downlink.piece
    for start in range(0, payload_len, step):
        size = min(step, payload_len - start)
        piece = None if into is None else into[start : start + size]
        await link.readinto(piece, timeout, size=size, idle=True)
        if downlink is not None:
            await downlink.consume(size)
    return message, b"" if into is None else into.toreadonly()
