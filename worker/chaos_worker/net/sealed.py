"""Sealed links: TLS 1.3 authenticates a connection and hands over its key; its frames
then travel as AES-256-GCM records on the bare socket.

Python's `ssl` encrypts through memory BIOs under asyncio: each record is written into a
BIO, read out of it as a new `bytes`, and on the other side written into one again, so
moving a gradient cost about four times what its cipher does (ADR 0003, *Sealed
records*). A sealed link keeps TLS for what TLS is for, the handshake: both certificates
are verified as before (`tls.py`), and the connecting side then sends, as one TLS
application record, a fresh random key of `KEY_BYTES`. From the next byte on, the
connecting side writes only records:

    length      u32, big-endian: the sealed bytes that follow (plaintext + `TAG_BYTES`)
    sealed      AES-256-GCM of 1 to `RECORD_BYTES` bytes of the frame stream, under the
                link's key; nonce: the record's number on the link (0, 1, ...), 96 bits;
                associated data: the length

(every `REKEY_RECORDS` records both sides replace the key by `next_key` of it)
and the accepting side reads them, decrypting each straight into the buffer its frame
is read into (`OpenedLink`). The numbering is implicit, so a record dropped, repeated,
reordered or changed fails its tag, as does one sealed for another link (another key):
the link is dropped and the refusal counted (`forged`). A length out of bounds is refused
before anything of its size is read. Links carry frames one way (`TcpTransport`), so one
key per connection, chosen by its sender, never seals two streams.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from chaos_worker.net.receiver import IncomingLink
from chaos_worker.net.shaping import PIECE
from chaos_worker.net.wire import FrameError

KEY_BYTES = 32
TAG_BYTES = 16
LENGTH_BYTES = 4
RECORD_BYTES = PIECE
"""The most plaintext one record seals: a piece of a payload, as the writer cuts them."""
REKEY_RECORDS = 1 << 14
"""Records sealed under one key, at most (16 GiB of full records): far inside the margin
TLS 1.3 keeps for AES-GCM (RFC 8446, 5.5: 2^24.5 records of 16 KiB, about 380 GB)."""
_TLS_HEADER = 5
_TLS_RECORD_MAX = (1 << 14) + 256
"""The largest TLS 1.3 record body (RFC 8446, 5.2): what a handshake record may hold."""
_TLS_CONTENT_TYPES = (20, 21, 22, 23)
"""change_cipher_spec, alert, handshake, application_data: a record of none is no TLS."""
_KEY_RECORDS_MAX = 4
"""Records the accepting side reads after its handshake, at most, for the key."""

ReadExactly = Callable[[int], Awaitable[bytes | bytearray]]


class _Records:
    """One direction's AES-256-GCM; the nonce is the record's number, and every
    `rekey_every` records the key is replaced by one derived from it (`REKEY_RECORDS`)."""

    def __init__(self, key: bytes, rekey_every: int = 0) -> None:
        self._key = key
        self._aead = AESGCM(key)
        self._count = 0
        self._rekey_every = rekey_every or REKEY_RECORDS

    def _nonce(self) -> bytes:
        if self._count and self._count % self._rekey_every == 0:
            self._key = next_key(self._key)
            self._aead = AESGCM(self._key)
        nonce = self._count.to_bytes(12, "big")
        self._count += 1
        return nonce

    def seal(self, plain: memoryview) -> memoryview:
        """One record (length, then sealed bytes) of `plain`, in a buffer of its own."""
        size = plain.nbytes + TAG_BYTES
        record = np.empty(LENGTH_BYTES + size, np.uint8)  # not zeroed: every byte is written
        length = size.to_bytes(LENGTH_BYTES, "big")
        record[:LENGTH_BYTES] = np.frombuffer(length, np.uint8)
        sealed = memoryview(record)
        nonce = self._nonce()  # first: it may change the key
        self._aead.encrypt_into(nonce, plain, length, sealed[LENGTH_BYTES:])
        return sealed

    def open(self, length: bytes, sealed: memoryview, into: memoryview) -> None:
        """Decrypt `sealed` into `into` (its plaintext's size), or refuse it (`forged`)."""
        nonce = self._nonce()  # first: it may change the key
        try:
            self._aead.decrypt_into(nonce, sealed, length, into)
        except InvalidTag:
            raise FrameError("a sealed record failed its authentication", "forged") from None


def next_key(key: bytes) -> bytes:
    """The key that follows `key` on a link (HKDF-SHA256): one-way, so a key found later
    opens none of the records sealed before it."""
    info = b"chaos sealed link: next key"
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(key)


class _Handshake:
    """TLS over memory BIOs, driven record by record over a connection's reads."""

    def __init__(
        self,
        context: ssl.SSLContext,
        server_side: bool,
        read_exactly: ReadExactly,
        write: Callable[[bytes], None],
    ) -> None:
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self._in, self._out, server_side=server_side)
        self._read_exactly = read_exactly
        self._write = write

    async def run(self) -> None:
        """The handshake; the peer's records are read one at a time, so no byte after
        the last one it needs is taken from the connection."""
        while True:
            try:
                self.tls.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            finally:  # an alert too goes out before a failure is raised
                self._flush()
            if done:
                return
            self._in.write(await self._record())

    def send(self, data: bytes) -> None:
        """`data` as TLS application data."""
        self.tls.write(data)
        self._flush()

    async def receive(self, size: int) -> bytes:
        """Exactly `size` bytes of application data, in at most `_KEY_RECORDS_MAX` records."""
        got = b""
        for _ in range(_KEY_RECORDS_MAX):
            self._in.write(await self._record())
            try:
                got += self.tls.read(size - len(got))
            except ssl.SSLWantReadError:
                continue
            if len(got) == size:
                return got
        raise ssl.SSLError("no link key after the handshake")

    async def _record(self) -> bytes:
        header = bytes(await self._read_exactly(_TLS_HEADER))
        size = int.from_bytes(header[3:5], "big")
        if header[0] not in _TLS_CONTENT_TYPES or header[1] != 3 or size > _TLS_RECORD_MAX:
            raise ssl.SSLError(f"not a TLS record: {header.hex()}")
        return header + bytes(await self._read_exactly(size))

    def _flush(self) -> None:
        if self._out.pending:
            self._write(self._out.read())


class ClientHandshake:
    """The connecting side of a sealed link once its handshake is done (`connect`): the
    server is verified, and no key has been sent yet."""

    def __init__(
        self,
        handshake: _Handshake,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self._handshake = handshake
        self._reader = reader
        self._writer = writer

    @property
    def server(self) -> ssl.SSLObject:
        """The TLS session: the server's verified certificate (`getpeercert`)."""
        return self._handshake.tls

    def seal(self) -> asyncio.StreamWriter:
        """Send a fresh link key; returns a writer whose every write is sealed under it
        (its `ssl_object` is `server`)."""
        key = os.urandom(KEY_BYTES)
        self._handshake.send(key)
        sealing = SealingTransport(self._writer, self._handshake.tls, key)
        loop = asyncio.get_running_loop()
        return asyncio.StreamWriter(sealing, sealing.get_protocol(), self._reader, loop)


async def connect(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, context: ssl.SSLContext
) -> ClientHandshake:
    """The connecting side's handshake over `writer`'s connection; the caller checks whom
    the server's certificate names, then seals the link (`ClientHandshake.seal`) or drops
    it, having sent it nothing. `ssl.SSLError` when the handshake fails, `OSError` or
    `IncompleteReadError` when the connection does."""
    handshake = _Handshake(context, False, reader.readexactly, writer.write)
    await handshake.run()
    return ClientHandshake(handshake, reader, writer)


async def open_sealed(
    host: str, port: int, context: ssl.SSLContext
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A sealed connection to `host:port` (`connect`), as `asyncio.open_connection` opens
    a bare one; what a worker's listener expects of a client under TLS."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        client = await connect(reader, writer, context)
    except BaseException:
        writer.close()
        raise
    return reader, client.seal()


async def accept(link: IncomingLink, context: ssl.SSLContext, timeout: float) -> OpenedLink:
    """The accepting side: the handshake and the link key, within `timeout`; then the
    link's frames are read through the returned `OpenedLink`."""
    transport = link.transport
    assert isinstance(transport, asyncio.Transport)

    async def read_exactly(size: int) -> bytes | bytearray:
        return await link.read(size, timeout)

    async with asyncio.timeout(timeout):
        handshake = _Handshake(context, True, read_exactly, transport.write)
        await handshake.run()
        key = await handshake.receive(KEY_BYTES)
    return OpenedLink(link, handshake.tls, key)


class SealingTransport(asyncio.Transport):
    """A connection's transport whose writes go out as sealed records (`_Records.seal`),
    a record per `RECORD_BYTES` of each write. Flow control stays the bare transport's,
    and so with its protocol."""

    def __init__(self, bare: asyncio.StreamWriter, tls: ssl.SSLObject, key: bytes) -> None:
        super().__init__()
        self._writer = bare  # held: a StreamWriter closes its transport once collected
        transport = bare.transport
        assert isinstance(transport, asyncio.Transport)
        self._bare = transport
        self._tls = tls
        self._records = _Records(key)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        for start in range(0, view.nbytes, RECORD_BYTES):
            self._bare.write(self._records.seal(view[start : start + RECORD_BYTES]))

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        self.write(b"".join(list_of_data))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._tls if name == "ssl_object" else self._bare.get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self._bare.is_closing()

    def close(self) -> None:
        self._bare.close()

    def abort(self) -> None:
        self._bare.abort()

    def can_write_eof(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return self._bare.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._bare.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._bare.set_write_buffer_limits(high, low)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._bare.get_protocol()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._bare.set_protocol(protocol)

    def is_reading(self) -> bool:
        return self._bare.is_reading()

    def pause_reading(self) -> None:
        self._bare.pause_reading()

    def resume_reading(self) -> None:
        self._bare.resume_reading()


class OpenedLink:
    """The frame stream of an accepted sealed link, read as `IncomingLink` reads a bare
    one (`receiver.read_frame` takes either).

    A record that fits in what a read still wants is decrypted straight into it (a
    payload's pieces, as the writer cuts them); a smaller read (a prefix, a header, a
    small frame) takes its bytes from the record's plaintext, kept until read. Besides the
    link's own buffer it holds at most one record sealed and one open.
    """

    def __init__(self, link: IncomingLink, tls: ssl.SSLObject, key: bytes) -> None:
        self._link = link
        self._tls = tls
        self._records = _Records(key)
        self._loop = asyncio.get_running_loop()
        self._sealed = memoryview(bytearray(0))
        self._open = memoryview(bytearray(0))
        self._plain = self._open[:0]  # opened and not read yet

    @property
    def received(self) -> int:
        """Bytes read off the connection (records, sealed)."""
        return self._link.received

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self._tls if name == "ssl_object" else self._link.get_extra_info(name, default)

    def close(self) -> None:
        self._link.close()

    def widen(self) -> None:
        self._link.widen()

    async def read(self, size: int, timeout: float) -> bytes | bytearray:
        """Exactly `size` bytes of the stream, all of them within `timeout`."""
        into = bytearray(size)  # taken from the opened record without a wait if it has them
        await self.readinto(memoryview(into), timeout)
        return into

    async def readinto(
        self, view: memoryview | None, timeout: float, *, size: int = 0, idle: bool = False
    ) -> None:
        """As `IncomingLink.readinto`: fill `view` (None: read `size` bytes to nothing)."""
        size = len(view) if view is not None else size
        deadline = self._loop.time() + timeout
        got = 0
        while True:
            take = min(size - got, len(self._plain))
            if take and view is not None:
                view[got : got + take] = self._plain[:take]
            self._plain = self._plain[take:]
            got += take
            if got == size:
                return
            wait = timeout if idle else max(deadline - self._loop.time(), 0.0)
            length = bytes(await self._link.read(LENGTH_BYTES, wait))
            sealed_size = int.from_bytes(length, "big")
            plain_size = sealed_size - TAG_BYTES
            if not 0 < plain_size <= RECORD_BYTES:
                raise FrameError(f"a sealed record of {sealed_size} bytes", "oversize")
            sealed = self._buffer("_sealed", sealed_size)
            await self._link.readinto(sealed, wait, idle=idle)
            if view is not None and plain_size <= size - got:
                self._records.open(length, sealed, view[got : got + plain_size])
                got += plain_size
            else:
                into = self._buffer("_open", plain_size)
                self._records.open(length, sealed, into)
                self._plain = into

    def _buffer(self, name: str, size: int) -> memoryview:
        """The first `size` bytes of buffer `name`, grown to fit (at most a record)."""
        buffer: memoryview = getattr(self, name)
        if len(buffer) < size:
            grown = max(size, min(2 * len(buffer), RECORD_BYTES + TAG_BYTES))
            buffer = memoryview(bytearray(grown))
            setattr(self, name, buffer)
        return buffer[:size]
