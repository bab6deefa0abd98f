"""Wire format: frame round trips, length limits, and hostile headers."""

from __future__ import annotations

import contextlib
import json

import pytest
from chaos_worker.config import Admission
from chaos_worker.membership.view import View
from chaos_worker.net.wire import (
    FRAME,
    MAX_HEADER_BYTES,
    Cause,
    Chunk,
    Decision,
    Goodbye,
    Heartbeat,
    Hello,
    JoinPlan,
    LinkGossip,
    MemberStatus,
    ObservedTotal,
    Ping,
    Pong,
    ProbeData,
    ProbeRequest,
    Proposal,
    ShardData,
    SnapshotGone,
    SnapshotManifest,
    SnapshotRequest,
    StateTransfer,
    StateWitness,
    WireError,
    WireMessage,
    decode_header,
    encode,
    parse_lengths,
)
from hypothesis import given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.unit

MESSAGES: list[WireMessage] = [
    Hello(sender="w0"),
    Goodbye(sender="w0"),
    Heartbeat(origin="w1", seq=7, epoch=2, step=40, samples_per_s=123.5, sent_at=1.25),
    Ping(sender="w2", sent_at=3.5),
    Pong(sender="w3", echo=3.5),
    Proposal(
        id="p1",
        origin="w1",
        kind="join",
        subject="w4",
        address="127.0.0.1:9000",
        detected_at=2.0,
        epoch=3,
    ),
    Proposal(
        id="p2",
        origin="w4",
        kind="join",
        subject="w4",
        address="127.0.0.1:9004",
        detected_at=2.0,
        epoch=-1,
        admission=Admission(
            job="run-1",
            party="local",
            member="w4",
            key_sha256="5e" * 32,
            not_before=1_700_000_000,
            not_after=1_702_592_000,
            sig="MEUCIQ" + "A" * 90,
        ),
    ),
    MemberStatus(id="s1", origin="w2", epoch=3, round=5, completed=4),
    Decision(
        id="d1",
        origin="w0",
        view=View(
            epoch=4,
            members={"w0": "127.0.0.1:9000", "w1": "127.0.0.1:9001"},
            speeds={"w0": 10.0, "w1": 12.5},
            overlay={"w0|w1": 1e9, "w0|w2": 1e9},
            down=["w0|w2"],
            root="w0",
            parent={"w0": None, "w1": "w0"},
        ),
        effective_step=12,
        immediate=False,
        replay_step=11,
        causes=[Cause(id="crash:w2:3", kind="crash", subject="w2", detected_at=2.5)],
    ),
    Chunk(sender="w1", epoch=4, step=12, phase="down", index=2, count=8),
    StateTransfer(sender="w0", step=12, layout={"slots": [], "total_bytes": 0}, sha256="ab" * 32),
    StateWitness(sender="w1", step=12, epoch=3, state_sha256="cd" * 32),
    JoinPlan(
        id="j1",
        origin="w0",
        joiner="w4",
        joiner_address="127.0.0.1:9000",
        step=12,
        state_bytes=4096,
        shards=4,
        assignment={"w0": [0, 1, 2], "w1": [3]},
        replicators={"w0": "127.0.0.1:9100", "w1": "127.0.0.1:9101"},
        bandwidths={"w0": 3e7, "w1": 1e7},
        manifest_from="w0",
        predicted_s=0.5,
        strategy="greedy",
    ),
    ObservedTotal(sender="w0", step=12, dtype="<f8"),
    SnapshotRequest(sender="w4", reply_to="127.0.0.1:9200", step=12, shards=4, index=3),
    SnapshotManifest(sender="w0", step=12, shards=1, layout={"slots": []}, sha256=["cd" * 32]),
    ShardData(sender="w1", step=12, shards=4, index=3),
    SnapshotGone(sender="w1", step=12, reason="overwritten"),
    LinkGossip(sender="w1", links={"bandwidth": {"w0|w1": (5e7, 1.5, 3.0)}, "rtt": {}}),
    ProbeRequest(sender="w4", reply_to="127.0.0.1:9200", frames=8, frame_bytes=65536),
    ProbeData(sender="w1", index=2, frames=8),
]


def _split(frame: list[bytes | memoryview]) -> tuple[bytes, bytes, bytes]:
    """Parse a whole encoded frame the way a reader would."""
    data = b"".join(bytes(part) for part in frame)
    header_len, payload_len = parse_lengths(data[: FRAME.size])
    header = data[FRAME.size : FRAME.size + header_len]
    payload = data[FRAME.size + header_len :]
    assert len(payload) == payload_len
    return data[: FRAME.size], header, payload


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: m.type)
def test_round_trip_every_message_type(message: WireMessage) -> None:
    payload = (
        bytes(range(256)) * 3
        if isinstance(message, Chunk | StateTransfer | ShardData | ObservedTotal | ProbeData)
        else b""
    )
    _, header, got_payload = _split(encode(message, payload))
    decoded = decode_header(header)
    assert type(decoded) is type(message)
    assert decoded == message
    assert got_payload == payload


def test_covers_every_message_type() -> None:
    from chaos_worker.net.wire import _ADAPTER

    union = _ADAPTER.json_schema()["discriminator"]["mapping"]
    assert {m.type for m in MESSAGES} == set(union)


def test_memoryview_payload_is_counted_in_bytes() -> None:
    import array

    floats = array.array("d", [1.0, 2.0, 3.0])
    frame = encode(
        Chunk(sender="w", epoch=0, step=0, phase="up", index=0, count=1), memoryview(floats)
    )
    _, _, payload = _split(frame)
    assert payload == floats.tobytes()


def test_lengths_within_limits_are_accepted() -> None:
    assert parse_lengths(FRAME.pack(MAX_HEADER_BYTES, 10), max_payload=10) == (MAX_HEADER_BYTES, 10)
    assert parse_lengths(FRAME.pack(1, 0), max_payload=0) == (1, 0)


@pytest.mark.parametrize("header_len", [0, MAX_HEADER_BYTES + 1, (1 << 32) - 1])
def test_bad_header_length_is_rejected(header_len: int) -> None:
    with pytest.raises(WireError, match="header length"):
        parse_lengths(FRAME.pack(header_len, 0))


def test_oversize_payload_is_rejected() -> None:
    with pytest.raises(WireError, match="payload length"):
        parse_lengths(FRAME.pack(10, 1025), max_payload=1024)
    with pytest.raises(WireError):
        parse_lengths(FRAME.pack(10, 1), max_payload=0)


def _decision_header(*, view: dict | None = None, view_extra=None, cause=None) -> dict:
    """The JSON header of a valid decision, with its view or cause replaced or added to."""
    decision = next(m for m in MESSAGES if isinstance(m, Decision))
    header = json.loads(decision.model_dump_json())
    if view is not None:
        header["view"] = view
    header["view"].update(view_extra or {})
    if cause is not None:
        header["causes"] = [cause]
    return header


def test_a_valid_decision_header_is_taken() -> None:
    decision = decode_header(json.dumps(_decision_header()).encode())
    assert isinstance(decision, Decision) and isinstance(decision.view, View)
    assert decision.causes[0].kind == "crash"
    join = {"id": "j1", "kind": "join", "mode": "observe", "subject": "w5", "detected_at": 1}
    decision = decode_header(json.dumps(_decision_header(cause=join)).encode())
    assert decision.causes == [Cause(**join)]


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b"not json",
        b"[]",
        b"null",
        b'{"type": "hello"',
        b'"hello"',
        b"\xff\xfe\x00",
    ],
)
def test_malformed_json_is_rejected(raw: bytes) -> None:
    with pytest.raises(WireError):
        decode_header(raw)


@pytest.mark.parametrize(
    "header",
    [
        {"type": "launch_missiles", "sender": "w0"},
        {"sender": "w0"},
        {"type": None, "sender": "w0"},
        {"type": "hello"},
        {"type": "hello", "sender": "w0", "extra": 1},
        {"type": "chunk", "sender": "w0", "epoch": 0, "step": 0, "phase": "sideways"},
        {"type": "ping", "sender": "w0", "sent_at": "yesterday"},
        _decision_header(view={"epoch": 1, "members": ["w0"]}),
        _decision_header(view_extra={"rogue": True}),
        _decision_header(cause={"kind": "crash", "subject": "w2"}),
        _decision_header(cause={"id": "c1", "kind": "meteor", "subject": "w2", "detected_at": 1}),
    ],
)
def test_unknown_type_and_bad_fields_are_rejected(header: dict) -> None:
    with pytest.raises(WireError):
        decode_header(json.dumps(header).encode())


def _join(address: str | None) -> dict:
    header = {
        "type": "proposal",
        "id": "p",
        "origin": "w4",
        "kind": "join",
        "subject": "w4",
        "detected_at": 1.0,
        "epoch": -1,
    }
    return header if address is None else {**header, "address": address}


@pytest.mark.parametrize(
    "address", [None, "", "w4", ":9000", "h:x", "h:70000", "h:-1", "h" * 300 + ":1"]
)
def test_a_join_names_a_host_port_address(address: str | None) -> None:
    """The address a newcomer gives is connected to by every member that plans for it: one
    that is missing or malformed is refused at decode, not where it is dialled."""
    with pytest.raises(WireError):
        decode_header(json.dumps(_join(address)).encode())
    assert decode_header(json.dumps(_join("node-4.svc:9000")).encode()) is not None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_only_ever_raise_wire_error(raw: bytes) -> None:
    with contextlib.suppress(WireError):
        decode_header(raw)


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.sampled_from(["type", "sender", "seq", "view"]), children)
        ),
        max_leaves=12,
    )
)
def test_random_json_only_ever_raises_wire_error(value: object) -> None:
    with contextlib.suppress(WireError):
        decode_header(json.dumps(value).encode())


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=FRAME.size, max_size=FRAME.size), st.integers(0, 1 << 32))
def test_random_prefixes_only_ever_raise_wire_error(prefix: bytes, max_payload: int) -> None:
    try:
        header_len, payload_len = parse_lengths(prefix, max_payload)
    except WireError:
        return
    assert 0 < header_len <= MAX_HEADER_BYTES
    assert payload_len <= max_payload
