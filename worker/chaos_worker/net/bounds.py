"""What a peer can make this worker hold or wait for, and what is done with what breaks it.

Bytes from a peer are bounded before they are read into memory: a frame's lengths are
checked against the transport's hard limit (`FrameError`: the connection goes, its framing
is lost), the first frame of a connection, before the peer said `Hello`, against
`HELLO_HEADER_BYTES` and no payload, and every later frame's payload against what its
message type may carry (`Limits.payload`). A connection that sends no `Hello` within
`Limits.handshake_timeout_s`, or no bytes for `Limits.idle_timeout_s`, is closed.

A message that breaks a bound but leaves the framing intact is dropped alone: it is
counted by reason in `Rejections` (`chaos_rejected_messages_total{reason}`) and logged once
per peer and reason, and the link goes on. One bad message never drops a link, suspects
its sender or stops the receiver. The limits and why: `docs/security.md`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from chaos_worker.config import BUCKET_BYTES, MAX_STATE_BYTES
from chaos_worker.net.wire import (
    MAX_PROBE_BYTES,
    MAX_PROBE_FRAMES,
    Chunk,
    Message,
    ObservedTotal,
    Ping,
    ProbeData,
    ShardData,
    StateTransfer,
    WireError,
    decode_header,
)

log = logging.getLogger(__name__)

REASONS = ("oversize", "malformed", "nonfinite", "stale", "unexpected", "forged", "unadmitted")
"""Why a message was refused: over a size limit; not a valid message (or a gradient of the
wrong length); a NaN or an infinity; from an epoch long gone; not expected here (e.g. a
gradient chunk far ahead of any operation this member knows of); not sealed by its origin,
or said by one that may not say it (`net.signing`); a join without a valid admission of the
joiner's party for this job and the joiner's certificate key (`membership.joiners`)."""

HELLO_HEADER_BYTES = 4096
"""The largest first frame of a connection (a `Hello`, with no payload)."""
HANDSHAKE_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 60.0
MAX_LOGGED = 1024
"""Peer and reason pairs logged; further ones are only counted (names are the peers')."""


@dataclass(frozen=True)
class Limits:
    """What one transport accepts from a peer after its `Hello`."""

    chunk_bytes: int = BUCKET_BYTES
    """A gradient `Chunk`: one bucket of the all-reduce (`WorkerConfig.bucket_bytes`)."""
    state_bytes: int = MAX_STATE_BYTES
    """A training state: a copy join's `StateTransfer`, a snapshot's `ShardData`, the
    `ObservedTotal` of a step streamed to a newcomer (`WorkerConfig.max_state_bytes`)."""
    handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S
    """For the first frame of a connection (it must be a `Hello`)."""
    idle_timeout_s: float = IDLE_TIMEOUT_S
    """For the next bytes of a connection (members send a heartbeat every 0.1 s)."""

    def payload(self, message: Message) -> int:
        """The largest payload `message`'s type carries; 0 for control messages."""
        if isinstance(message, Chunk):
            return self.chunk_bytes
        if isinstance(message, StateTransfer | ShardData | ObservedTotal):
            return self.state_bytes
        if isinstance(message, Ping):
            return MAX_PROBE_BYTES  # a bandwidth probe's payload
        if isinstance(message, ProbeData):
            return MAX_PROBE_BYTES // MAX_PROBE_FRAMES
        return 0

    @property
    def largest(self) -> int:
        """The largest payload of any message type: the transport's hard limit."""
        return max(self.chunk_bytes, self.state_bytes, MAX_PROBE_BYTES)


Reject = Callable[[str, str, str], None]
"""Refuse one message: (peer, reason, detail); a `Rejections` is one."""


class Rejections:
    """Messages refused, counted by reason; each peer and reason is logged once.

    `count(reason)` is called for every one (the worker's Prometheus counter). `reasons`
    and `what` serve other refusals alike (TLS handshakes: `net.tls.HANDSHAKE_REASONS`).
    """

    def __init__(
        self,
        count: Callable[[str], None] | None = None,
        *,
        reasons: tuple[str, ...] = REASONS,
        what: str = "a message",
    ) -> None:
        self.counts: Counter[str] = Counter()
        self._count = count
        self._reasons = reasons
        self._what = what
        self._logged: set[tuple[str, str]] = set()

    def __call__(self, peer: str, reason: str, detail: str) -> None:
        """Refuse one message from `peer` for `reason` (one of `reasons`)."""
        if reason not in self._reasons:
            raise ValueError(f"unknown reason {reason!r}")
        self.counts[reason] += 1
        if self._count is not None:
            self._count(reason)
        key = (peer, reason)
        if key not in self._logged and len(self._logged) < MAX_LOGGED:
            self._logged.add(key)
            log.warning(
                "refused %s from %r (%s): %s; further ones are only counted",
                self._what,
                peer,
                reason,
                detail,
            )


@dataclass
class Guard:
    """What a transport lets in: its `limits`, and the `rejections` it counts."""

    limits: Limits = field(default_factory=Limits)
    rejections: Rejections = field(default_factory=Rejections)

    def admit(self, peer: str, header: bytes, payload_len: int) -> Message | None:
        """The message of a whole frame's header from `peer` (after its `Hello`), or None
        when it is refused: invalid, or its payload over what its type may carry."""
        try:
            message = decode_header(header)
        except WireError as exc:
            self.refuse(peer, exc)
            return None
        limit = self.limits.payload(message)
        if payload_len > limit:
            detail = f"{message.type} payload of {payload_len} bytes, over {limit}"
            self.rejections(peer, "oversize", detail)
            return None
        return message

    def refuse(self, peer: str, error: WireError) -> None:
        self.rejections(peer, error.reason, str(error))
