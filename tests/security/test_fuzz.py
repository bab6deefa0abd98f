"""Fuzzing the frame decoder and message validation: whatever a peer sends, decoding
returns a valid message (every float finite, every integer in range, and it round-trips)
or raises `WireError`, never anything else; a guarded transport's `admit` never raises at
all; and the collective never raises on a decoded chunk, whatever its numbers or payload.
"""

from __future__ import annotations

import contextlib
import json
import math

import numpy as np
import pytest
from chaos_worker.collective import MAX_AHEAD_OPS, TreeAllReduce
from chaos_worker.net.bounds import Guard, Limits, Rejections
from chaos_worker.net.wire import (
    FRAME,
    MAX_HEADER_BYTES,
    MAX_WIRE_INT,
    Chunk,
    FrameError,
    Message,
    WireError,
    decode_header,
    encode,
    parse_lengths,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.test_wire import MESSAGES

pytestmark = pytest.mark.security

NASTY = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e308, -1e308, 5e-324, 0.0, -0.0]),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([-1, 0, 1, MAX_WIRE_INT, MAX_WIRE_INT + 1, -2]),
    st.text(max_size=6),
    st.none(),
    st.booleans(),
    st.lists(st.integers(-2, 2) | st.floats(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.floats() | st.integers(), max_size=2),
)
"""Values a hostile peer puts where a message has a field."""
NUMBERS = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1.0, -2, 2**53, 2**64, -(2**63)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**70), max_value=2**70),
)
"""What a hostile peer puts where a message has a number."""
OVERFLOW = st.sampled_from(["Infinity", "1e999", "1E400", "9" * 400 + ".0"])
"""How an infinity may be spelled in JSON text."""


def _paths(value: object, prefix: tuple = (), depth: int = 3) -> list[tuple]:
    """Every place in a JSON value that can be replaced (dict keys, list items)."""
    found = [prefix] if prefix else []
    if depth and isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key), depth - 1)
    elif depth and isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, (*prefix, index), depth - 1)
    return found


def _get(value: object, path: tuple) -> object:
    for step in path:
        value = value[step]
    return value


def _put(value: object, path: tuple, new: object) -> None:
    """Replace what is at `path`, unless an earlier replacement took it away."""
    with contextlib.suppress(KeyError, IndexError, TypeError):
        for step in path[:-1]:
            value = value[step]
        value[path[-1]] = new


@st.composite
def hostile_headers(draw) -> bytes:
    """A real message's JSON header with some of its fields replaced by nasty values."""
    template = json.loads(draw(st.sampled_from(MESSAGES)).model_dump_json())
    paths = _paths(template)
    numbers = [p for p in paths if type(_get(template, p)) in (int, float)]
    if numbers and draw(st.booleans()):  # a number out of range, or not finite
        _put(template, draw(st.sampled_from(numbers)), draw(NUMBERS))
    for path in draw(st.lists(st.sampled_from(paths), max_size=2)):
        _put(template, path, draw(NASTY))
    text = json.dumps(template, allow_nan=True)
    return text.replace("Infinity", draw(OVERFLOW)).encode()


def _numbers(value: object):
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, int | float):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _numbers(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _numbers(item)


def _assert_valid(message: Message) -> None:
    for number in _numbers(message.model_dump()):
        if isinstance(number, float):
            assert math.isfinite(number), message
        else:
            assert -MAX_WIRE_INT <= number <= MAX_WIRE_INT, message
    again = decode_header(b"".join(bytes(p) for p in encode(message))[FRAME.size :])
    assert again == message


@settings(max_examples=600, deadline=None)
@given(hostile_headers())
def test_a_hostile_header_decodes_to_a_valid_message_or_raises_wire_error(raw: bytes) -> None:
    try:
        message = decode_header(raw)
    except WireError as error:
        assert error.reason in ("malformed", "nonfinite")
        return
    _assert_valid(message)


FRAMES = st.tuples(
    st.sampled_from([0, 1, 7, MAX_HEADER_BYTES, MAX_HEADER_BYTES + 1, (1 << 32) - 1])
    | st.integers(0, (1 << 32) - 1),
    st.sampled_from([0, 1, 4 << 20, (4 << 20) + 1, (1 << 32) - 1]) | st.integers(0, (1 << 32) - 1),
    hostile_headers() | st.binary(max_size=256),
)


@settings(max_examples=600, deadline=None)
@given(FRAMES)
def test_a_hostile_frame_is_framed_refused_or_delivered_valid(frame: tuple) -> None:
    """Lengths first (a `FrameError` drops the connection), then the header through the
    guard a transport uses: a valid message within its type's limit, or a refusal that
    is counted; nothing raises past the guard."""
    header_len, payload_len, header = frame
    rejections = Rejections()
    guard = Guard(Limits(), rejections)
    try:
        length, size = parse_lengths(FRAME.pack(header_len, payload_len), guard.limits.largest)
    except FrameError:
        return
    assert (length, size) == (header_len, payload_len)
    message = guard.admit("mallory", header[:length], size)
    if message is None:
        assert sum(rejections.counts.values()) == 1
        return
    _assert_valid(message)
    assert size <= guard.limits.payload(message)


CHUNKS = st.builds(
    Chunk,
    sender=st.just("w1"),
    epoch=st.integers(-1, 3),
    step=st.integers(-1, 12),
    phase=st.sampled_from(["up", "down"]),
    index=st.integers(0, 4),
    count=st.integers(5, 6),
).filter(lambda c: c.index < c.count)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(CHUNKS, st.binary(max_size=40)), max_size=40), st.booleans())
def test_the_collective_never_raises_and_holds_little(deliveries: list, expect: bool) -> None:
    rejections = Rejections()
    collective = TreeAllReduce(
        "w0",
        lambda *_: True,
        size=9,
        dtype=np.float32,
        bucket_bytes=8,
        expects=lambda _sender, _epoch, step: expect or step <= 6,
        reject=rejections,
    )
    for chunk, payload in deliveries:
        collective.deliver("w1", chunk, payload)
    refused = sum(rejections.counts.values())
    assert collective.held + refused <= len(deliveries)
    assert collective.held <= (MAX_AHEAD_OPS + 1) * 2 * 5  # ops ahead and the current one


def _numeric_paths() -> list[tuple[Message, tuple, type]]:
    """(message, path, int or float) for every number of every message type's example."""
    found = []
    for message in MESSAGES:
        template = json.loads(message.model_dump_json())
        for path in _paths(template, depth=4):
            kind = type(_get(template, path))
            if kind in (int, float):
                found.append((message, path, kind))
    return found


@pytest.mark.parametrize(
    ("message", "path", "kind"),
    _numeric_paths(),
    ids=lambda v: ".".join(map(str, v)) if isinstance(v, tuple) else getattr(v, "type", ""),
)
def test_every_number_of_every_message_is_checked(message: Message, path: tuple, kind) -> None:
    """Not by sampling: each number of each type, made infinite, NaN or (an integer)
    past what a JSON reader holds exactly, is refused."""
    bad = [math.nan, math.inf, -math.inf] + ([2**64, -(2**64)] if kind is int else [])
    for value in bad:
        header = json.loads(message.model_dump_json())
        _put(header, path, value)
        with pytest.raises(WireError):
            decode_header(json.dumps(header, allow_nan=True).encode())
    header = json.loads(message.model_dump_json())
    _put(header, path, "__X__")
    with pytest.raises(WireError, match="finite"):  # also spelled as an overflow
        decode_header(json.dumps(header).replace('"__X__"', "1e999").encode())
