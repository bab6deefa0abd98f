"""Wire format between workers: length-prefixed frames of a JSON header plus raw bytes.

A frame is `!II` (header length, payload length), a UTF-8 JSON header validated against
the `Message` union, then the payload (tensor bytes, possibly empty). Lengths are bounded
and every header is validated before use: bytes from a peer are never trusted.
"""

from __future__ import annotations

import struct
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from chaos_worker.membership.view import View
from chaos_worker.telemetry.linktable import plausible

FRAME = struct.Struct("!II")
MAX_HEADER_BYTES = 1 << 20
MAX_PAYLOAD_BYTES = (1 << 32) - 1


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


class WireError(Exception):
    """A peer sent a frame that does not parse or breaks a limit."""


class WireMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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
    seq: int
    epoch: int
    step: int
    samples_per_s: float
    sent_at: float
    replicator: str = ""
    members: int = Field(0, ge=0, le=1 << 16)  # size of its view (0: not a member)


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
    gap_s: float | None = Field(None, ge=0, le=3600, allow_inf_nan=False)


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
    address: str = ""
    detected_at: float
    epoch: int
    mode: Literal["observe", "copy", "ready", "probe"] = "copy"
    links: LinkShare = Field(default_factory=dict)
    ready_in_s: float = Field(0.0, ge=0, le=600, allow_inf_nan=False)
    """A `ready` join: seconds until the newcomer expects to hold the state (0: now)."""
    confirmed: bool = False
    """A crash: the subject's address refused a connection, so it is known to be dead
    (not merely cut off), and the majority rule does not count it."""


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
    epoch: int
    round: int
    completed: int


class Cause(BaseModel):
    """The proposal behind a decision, as the decision carries it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

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
    effective_step: int
    immediate: bool
    replay_step: int | None = None
    causes: list[Cause] = Field(default_factory=list)


class Chunk(WireMessage):
    """One bucket of a tree all-reduce (`up`: partial sums, `down`: totals)."""

    type: Literal["chunk"] = "chunk"
    sender: str
    epoch: int
    step: int
    phase: Literal["up", "down"]
    index: int
    count: int


class StateTransfer(WireMessage):
    """Full training state for a newcomer (payload: torch.save bytes, weights only)."""

    type: Literal["state"] = "state"
    sender: str
    step: int
    sha256: str


class JoinPlan(WireMessage):
    """The root's shard plan for a newcomer, flooded so every source pins snapshot `step`."""

    type: Literal["join_plan"] = "join_plan"
    id: str
    origin: str
    joiner: str
    joiner_address: str
    step: int
    state_bytes: int
    shards: int
    assignment: dict[str, list[int]]
    replicators: dict[str, str]
    bandwidths: dict[str, float]
    manifest_from: str
    predicted_s: float
    strategy: str
    figures: dict[str, Literal["measured", "shaped", "default"]] = Field(default_factory=dict)


class ObservedTotal(WireMessage):
    """The reduced gradient sum of `step`, streamed to an observer (payload: the total)."""

    type: Literal["observed"] = "observed"
    sender: str
    step: int
    dtype: str


class SnapshotRequest(WireMessage):
    """Newcomer -> replicator: the manifest (`index` None) or one shard of snapshot `step`."""

    type: Literal["snap_req"] = "snap_req"
    sender: str
    reply_to: str
    step: int
    shards: int = Field(gt=0, le=1 << 20)
    index: int | None = None


class SnapshotManifest(WireMessage):
    """What snapshot `step` holds: its layout and the SHA-256 of each of `shards` shards."""

    type: Literal["snap_manifest"] = "snap_manifest"
    sender: str
    step: int
    shards: int
    layout: dict
    sha256: list[str]


class ShardData(WireMessage):
    """Shard `index` of `shards` of snapshot `step` (payload: its bytes)."""

    type: Literal["shard"] = "shard"
    sender: str
    step: int
    shards: int
    index: int


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
    index: int
    frames: int


class SnapshotGone(WireMessage):
    """The replicator cannot serve snapshot `step` (overwritten, or never published)."""

    type: Literal["snap_gone"] = "snap_gone"
    sender: str
    step: int
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


def parse_lengths(prefix: bytes, max_payload: int = MAX_PAYLOAD_BYTES) -> tuple[int, int]:
    """Header and payload lengths from a frame prefix, checked against the limits."""
    header_len, payload_len = FRAME.unpack(prefix)
    if not 0 < header_len <= MAX_HEADER_BYTES:
        raise WireError(f"header length {header_len} out of range")
    if payload_len > max_payload:
        raise WireError(f"payload length {payload_len} exceeds {max_payload}")
    return header_len, payload_len


def decode_header(raw: bytes) -> Message:
    """Validate a JSON header against the message union."""
    try:
        return _ADAPTER.validate_json(raw)
    except ValidationError as exc:
        raise WireError(f"invalid message: {exc.errors()[0]['msg']}") from None
