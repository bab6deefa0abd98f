"""Wire format between workers: length-prefixed frames of a JSON header plus raw bytes.

A frame is `!II` (header length, payload length), a UTF-8 JSON header validated against
the `Message` union, then the payload (tensor bytes, possibly empty). Lengths are bounded
and every header is validated before use: bytes from a peer are never trusted. Every float
on the wire is finite (NaN and infinities, also those a number too large makes, are refused
at decode) and every integer lies in a declared range. What a transport accepts per message
type and how long it waits: `chaos_worker.net.bounds`.
"""

from __future__ import annotations

import math
import struct
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from chaos_worker.config import Admission
from chaos_worker.membership.view import View
from chaos_worker.net.address import Address
from chaos_worker.telemetry.linktable import plausible

FRAME = struct.Struct("!II")
MAX_HEADER_BYTES = 1 << 20
MAX_PAYLOAD_BYTES = (1 << 32) - 1

MAX_WIRE_INT = 2**53 - 1
"""The largest integer a message may carry: every JSON reader holds it exactly."""
Number = Annotated[int, Field(ge=-1, le=MAX_WIRE_INT)]
"""An epoch, a step or a sequence number (-1: none yet, e.g. a newcomer's epoch)."""
Count = Annotated[int, Field(ge=0, le=MAX_WIRE_INT)]
"""A size, an index or a count."""
NonNegative = Annotated[float, Field(ge=0)]
"""A duration, a rate or a bandwidth (finite, as every float on the wire)."""


MAX_LINK_ENTRIES = 512
"""Most link figures one message may carry (gossip, a join's measurements)."""
MAX_PROBE_BYTES = 4 << 20
MAX_PROBE_FRAMES = 64

_ID = r"[A-Za-z0-9_.-]{1,64}"
LinkKey = Annotated[str, Field(pattern=rf"^{_ID}\|{_ID}$")]


def _check_links(
    links: dict[str, dict[str, tuple[float, float, float]]],
) -> dict[str, dict[str, tuple[float, float, float]]]:
    """A peer's link figures: bounded in number, every one plausible, no loops."""
    if sum(len(entries) for entries in links.values()) > MAX_LINK_ENTRIES:
        raise ValueError(f"more than {MAX_LINK_ENTRIES} link figures")
    for kind, entries in links.items():
        for key, entry in entries.items():
            src, _, dst = key.partition("|")
            if src == dst or not plausible(kind, *entry):
                raise ValueError(f"implausible {kind} figure for {key}")
    return links


LinkShare = Annotated[
    dict[
        Literal["rtt", "bandwidth"],
        dict[LinkKey, tuple[float, float, float]],
    ],
    AfterValidator(_check_links),
]
"""`LinkTable.share()` on the wire: `{kind: {"src|dst": [value, age_s, samples]}}`."""


def _bounded_json(value: dict[str, JsonValue]) -> dict[str, JsonValue]:
    """A free-form JSON object holds no NaN or infinity either, nor an integer past
    `MAX_WIRE_INT`."""
    todo: list[JsonValue] = [value]
    while todo:
        item = todo.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise PydanticCustomError("finite_number", "Input should be a finite number")
        if isinstance(item, int) and abs(item) > MAX_WIRE_INT:
            raise ValueError(f"integer past {MAX_WIRE_INT}")
        if isinstance(item, dict):
            todo.extend(item.values())
        elif isinstance(item, list):
            todo.extend(item)
    return value


BoundedJson = Annotated[dict[str, JsonValue], AfterValidator(_bounded_json)]


class WireError(Exception):
    """A peer sent a frame that does not parse or breaks a limit.

    `reason` is one of `bounds.REASONS`: why the message was refused.
    """

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


class FrameError(WireError):
    """A frame's lengths break the limits: where the next frame starts is unknown (or not
    worth reading to), so the connection must go."""


class WireMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


MAX_SEAL_CERT = 4096
"""Most base64 characters of a seal's certificate (a P-256 leaf is about 700)."""


class Seal(BaseModel):
    """The origin's signature of a flooded message (`chaos_worker.net.signing`): its
    certificate (base64 DER) and an ECDSA signature (base64 DER) of the message's JSON
    without the seal."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cert: str = Field(max_length=MAX_SEAL_CERT, pattern=r"^[A-Za-z0-9+/=]+$")
    sig: str = Field(max_length=256, pattern=r"^[A-Za-z0-9+/=]+$")


class Hello(WireMessage):
    """First frame on every connection: who is speaking."""

    type: Literal["hello"] = "hello"
    sender: str


class Goodbye(WireMessage):
    """Sent before a graceful close so the peer does not suspect a crash."""

    type: Literal["goodbye"] = "goodbye"
    sender: str


class Heartbeat(WireMessage):
    """Flooded liveness beacon of `origin`; also carries its progress and speed."""

    type: Literal["heartbeat"] = "heartbeat"
    origin: str
    seq: Number
    epoch: Number
    step: Number
    samples_per_s: NonNegative
    sent_at: float
    replicator: str = ""
    members: int = Field(0, ge=0, le=1 << 16)  # size of its view (0: not a member)
    seal: Seal | None = None


class Ping(WireMessage):
    """Per-link liveness and round-trip probe; answered by `Pong` on the same link."""

    type: Literal["ping"] = "ping"
    sender: str
    sent_at: float


class Pong(WireMessage):
    type: Literal["pong"] = "pong"
    sender: str
    echo: float
    # answering a probe's payload Ping: seconds between reading the pair's empty marker and
    # reading the payload, on the answering member's clock (probes.py)
    gap_s: float | None = Field(None, ge=0, le=3600)


ProposalKind = Literal["leave", "crash", "link_down", "link_up", "join", "reset"]
"""`reset`: a connection between two live members broke; the step in flight is redone."""


class Proposal(WireMessage):
    """A membership or overlay change observed by `origin`, flooded to everybody."""

    type: Literal["proposal"] = "proposal"
    id: str
    origin: str
    kind: ProposalKind
    subject: str
    peer: str = ""
    address: Address | Literal[""] = ""
    detected_at: float
    epoch: Number
    mode: Literal["observe", "copy", "ready", "probe"] = "copy"
    links: LinkShare = Field(default_factory=dict)
    ready_in_s: float = Field(0.0, ge=0, le=600)
    """A `ready` join: seconds until the newcomer expects to hold the state (0: now)."""
    confirmed: bool = False
    """A crash: the subject's address refused a connection, so it is known to be dead
    (not merely cut off), and the majority rule does not count it."""
    admission: Admission | None = None
    """A join: the joiner's admission, signed by its party's worker CA (with TLS)."""
    seal: Seal | None = None

    @model_validator(mode="after")
    def _join_names_its_address(self) -> Proposal:
        if self.kind == "join" and not self.address:
            raise ValueError("a join proposal names the joiner's address")
        return self


class LinkGossip(WireMessage):
    """A member's link figures for its neighbours (every few heartbeats, not flooded)."""

    type: Literal["links"] = "links"
    sender: str
    links: LinkShare


class MemberStatus(WireMessage):
    """A member's progress, sent to the recovery coordinator after an abort."""

    type: Literal["status"] = "status"
    id: str
    origin: str
    epoch: Number
    round: Count
    completed: Number
    seal: Seal | None = None


class Cause(BaseModel):
    """The proposal behind a decision, as the decision carries it."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    id: str
    kind: ProposalKind
    mode: Literal["observe", "copy", "ready", "probe"] = "copy"
    subject: str
    peer: str = ""
    detected_at: float

    @classmethod
    def of(cls, proposal: Proposal) -> Cause:
        return cls(
            id=proposal.id,
            kind=proposal.kind,
            mode=proposal.mode,
            subject=proposal.subject,
            peer=proposal.peer,
            detected_at=proposal.detected_at,
        )


class Decision(WireMessage):
    """A new view, effective at `effective_step`, flooded from the deciding node."""

    type: Literal["decision"] = "decision"
    id: str
    origin: str
    view: View
    effective_step: Number
    immediate: bool
    replay_step: Number | None = None
    causes: list[Cause] = Field(default_factory=list)
    seal: Seal | None = None


class Chunk(WireMessage):
    """One bucket of a tree all-reduce (`up`: partial sums, `down`: totals)."""

    type: Literal["chunk"] = "chunk"
    sender: str
    epoch: Number
    step: Number
    phase: Literal["up", "down"]
    index: Count
    count: Count

    @model_validator(mode="after")
    def _index_within_count(self) -> Chunk:
        if self.index >= self.count:
            raise ValueError(f"bucket {self.index} of {self.count}")
        return self


SHA256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
"""A SHA-256 digest in lower-case hex."""


class StateTransfer(WireMessage):
    """Full training state for a newcomer (payload: the flat state, as a snapshot holds it,
    laid out by `layout`); with TLS sealed by `sender`, whose state it is (`net.signing`)."""

    type: Literal["state"] = "state"
    sender: str
    step: Number
    epoch: Number = -1
    """The epoch of the decision that admits the newcomer (-1: not said)."""
    layout: BoundedJson
    sha256: SHA256
    seal: Seal | None = None


class StateWitness(WireMessage):
    """A second member's word on the state a `copy` joiner takes by the decision of `epoch`:
    the `state_digest` of its own state at `step`; with TLS sealed by `sender`."""

    type: Literal["state_witness"] = "state_witness"
    sender: str
    step: Number
    epoch: Number
    state_sha256: SHA256
    seal: Seal | None = None


class JoinPlan(WireMessage):
    """The root's shard plan for a newcomer, flooded so every source pins snapshot `step`."""

    type: Literal["join_plan"] = "join_plan"
    id: str
    origin: str
    joiner: str
    joiner_address: Address
    step: Number
    state_bytes: Count
    shards: Count
    assignment: dict[str, list[Count]]
    replicators: dict[str, Address]
    bandwidths: dict[str, NonNegative]
    manifest_from: str
    predicted_s: NonNegative
    strategy: str
    figures: dict[str, Literal["measured", "shaped", "default"]] = Field(default_factory=dict)
    seal: Seal | None = None


class ObservedTotal(WireMessage):
    """The reduced gradient sum of `step`, streamed to an observer (payload: the total)."""

    type: Literal["observed"] = "observed"
    sender: str
    step: Number
    dtype: Literal["<f4", "<f8", ">f4", ">f8"]


class SnapshotRequest(WireMessage):
    """Newcomer -> replicator: the manifest (`index` None) or one shard of snapshot `step`."""

    type: Literal["snap_req"] = "snap_req"
    sender: str
    reply_to: str
    step: Number
    shards: int = Field(gt=0, le=1 << 20)
    index: Count | None = None


class SnapshotManifest(WireMessage):
    """What snapshot `step` holds: its layout and the SHA-256 of each of `shards` shards;
    with TLS sealed by `sender`, the member whose snapshot it is (`net.signing`)."""

    type: Literal["snap_manifest"] = "snap_manifest"
    sender: str
    step: Number
    shards: Count
    layout: BoundedJson
    sha256: list[SHA256] = Field(max_length=1 << 20)
    seal: Seal | None = None


class ShardData(WireMessage):
    """Shard `index` of `shards` of snapshot `step` (payload: its bytes)."""

    type: Literal["shard"] = "shard"
    sender: str
    step: Number
    shards: Count
    index: Count


class ProbeRequest(WireMessage):
    """Newcomer -> replicator: send `frames` frames of `frame_bytes` zeros back to time."""

    type: Literal["probe_req"] = "probe_req"
    sender: str
    reply_to: str
    frames: int = Field(ge=1, le=MAX_PROBE_FRAMES)
    frame_bytes: int = Field(ge=1, le=MAX_PROBE_BYTES // MAX_PROBE_FRAMES)


class ProbeData(WireMessage):
    """Frame `index` of `frames` of a downlink probe (payload: zeros)."""

    type: Literal["probe_data"] = "probe_data"
    sender: str
    index: Count
    frames: Count


class SnapshotGone(WireMessage):
    """The replicator cannot serve snapshot `step` (overwritten, or never published)."""

    type: Literal["snap_gone"] = "snap_gone"
    sender: str
    step: Number
    reason: str


Message = Annotated[
    Hello
    | Goodbye
    | Heartbeat
    | Ping
    | Pong
    | Proposal
    | LinkGossip
    | MemberStatus
    | Decision
    | Chunk
    | StateTransfer
    | StateWitness
    | JoinPlan
    | ObservedTotal
    | SnapshotRequest
    | SnapshotManifest
    | ShardData
    | ProbeRequest
    | ProbeData
    | SnapshotGone,
    Field(discriminator="type"),
]
_ADAPTER: TypeAdapter[Message] = TypeAdapter(Message)


def encode(message: WireMessage, payload: bytes | memoryview = b"") -> list[bytes | memoryview]:
    """The buffers of one frame, ready for `writelines`."""
    header = message.model_dump_json().encode()
    return [FRAME.pack(len(header), memoryview(payload).nbytes), header, payload]


def parse_lengths(
    prefix: bytes, max_payload: int = MAX_PAYLOAD_BYTES, max_header: int = MAX_HEADER_BYTES
) -> tuple[int, int]:
    """Header and payload lengths from a frame prefix, checked against the limits (before
    anything of that size is read or allocated); `FrameError` when they break one."""
    header_len, payload_len = FRAME.unpack(prefix)
    if header_len == 0:
        raise FrameError("header length 0 out of range", "malformed")
    if header_len > max_header:
        raise FrameError(f"header length {header_len} out of range (> {max_header})", "oversize")
    if payload_len > max_payload:
        raise FrameError(f"payload length {payload_len} exceeds {max_payload}", "oversize")
    return header_len, payload_len


def decode_header(raw: bytes) -> Message:
    """Validate a JSON header against the message union; `WireError` (reason `nonfinite`
    for a NaN or an infinity, else `malformed`) when it is not a valid message."""
    try:
        return _ADAPTER.validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        nonfinite = any(error["type"] == "finite_number" for error in errors)
        reason = "nonfinite" if nonfinite else "malformed"
        raise WireError(f"invalid message: {errors[0]['msg']}", reason) from None
