"""A newcomer measures its downlink from each member before it asks to join.

Links *to* a newcomer are unknown to everybody: it has never been in a view, so nobody
probed them. Before it sends its join proposal, the newcomer asks every member's replicator
for a short train of frames (`ProbeRequest`; 8 x 64 KiB by default) over the same shaped
link that its shards will later take, and times their arrival on its own clock.

**One source at a time.** Probes to one newcomer all end at its downlink: run in parallel,
each would measure its share of the downlink (and of the newcomer's CPU), not what the
source can deliver, and the fast sources would look as slow as the slow ones. Sequential
probes cost the sum of their times (a few milliseconds per fast source, at most `timeout_s`
for a slow one) before the join request, which is counted in the scale-out delay.

**The estimate** (`estimate`): token buckets and TCP slow start let the first bytes of a
train through faster than the link's rate, and the request's round trip and the source's
wake-up make the whole train look slower. The tail of the train (frames after the middle
one, timed from the middle frame's arrival) measures the steady rate; a receiver that read
several frames at once would make the tail look too fast, so the estimate is the smaller of
the tail's rate and the whole train's rate (request to last byte). A train that does not
complete within `timeout_s` (0.25 s) gives `max(frames received, 1) x frame_bytes /
timeout_s`, what the link delivered in that time: a slow link stays slow in the plan. Each
connection is opened by a one-byte warm-up first, so connection set-up is not timed; a
source that does not answer it within `WARM_UP_TIMEOUT_S` gets no figure at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

from chaos_worker.net.shaping import TokenBucket
from chaos_worker.net.transport import TcpTransport, TransportFactory
from chaos_worker.net.wire import Message, ProbeData, ProbeRequest

PROBE_FRAMES = 8
PROBE_FRAME_BYTES = 64 << 10
PROBE_TIMEOUT_S = 0.25
WARM_UP_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class Measurement:
    """A probe's result as a transfer: `nbytes` in `seconds` (and its rate)."""

    nbytes: int
    seconds: float
    complete: bool

    @property
    def bytes_per_s(self) -> float:
        return self.nbytes / self.seconds


def estimate(
    sent_at: float, arrivals: list[float], frames: int, frame_bytes: int, timeout_s: float
) -> Measurement:
    """The downlink rate from a probe train sent at `sent_at` (see the module docstring)."""
    if len(arrivals) < frames:
        return Measurement(max(len(arrivals), 1) * frame_bytes, timeout_s, False)
    whole = Measurement(frames * frame_bytes, max(arrivals[-1] - sent_at, 1e-9), True)
    mid = frames // 2
    tail_s = arrivals[-1] - arrivals[mid - 1] if mid else 0.0
    if tail_s <= 0:
        return whole
    tail = Measurement((frames - mid) * frame_bytes, tail_s, True)
    return min(tail, whole, key=lambda m: m.bytes_per_s)


class _Train:
    """Arrival times of the frames of the probe in flight."""

    def __init__(self, source: str, frames: int) -> None:
        self.source = source
        self.frames = frames
        self.arrivals: list[float] = []
        self.done = asyncio.Event()

    def on_frame(self, sender: str, message: Message) -> None:
        if sender != self.source or not isinstance(message, ProbeData):
            return
        if message.index == len(self.arrivals) and message.frames == self.frames:
            self.arrivals.append(time.monotonic())
            if len(self.arrivals) == self.frames:
                self.done.set()


async def probe_downlinks(
    me: str,
    replicators: dict[str, str],
    *,
    host: str = "127.0.0.1",
    downlink: TokenBucket | None = None,
    frames: int = PROBE_FRAMES,
    frame_bytes: int = PROBE_FRAME_BYTES,
    timeout_s: float = PROBE_TIMEOUT_S,
    transport_factory: TransportFactory = TcpTransport,
) -> dict[str, Measurement]:
    """Probe `replicators` (`{member: host:port}`) one after another, in id order."""
    train = _Train("", frames)

    def on_message(sender: str, message: Message, _payload: bytes) -> None:
        train.on_frame(sender, message)

    transport = transport_factory(
        me, on_message, lambda _peer, _graceful: None, max_payload=frame_bytes, downlink=downlink
    )
    address = f"{host}:{await transport.listen(host, 0)}"
    results: dict[str, Measurement] = {}
    try:
        for source, replicator in sorted(replicators.items()):
            transport.connect(source, replicator)
            train = _Train(source, 1)  # warm-up: both connections are open afterwards
            warm_up = ProbeRequest(sender=me, reply_to=address, frames=1, frame_bytes=1)
            transport.send(source, warm_up)
            if not await _wait(train.done, WARM_UP_TIMEOUT_S):
                transport.disconnect(source)  # no answer at all: no figure (not a slow one)
                continue
            train = _Train(source, frames)
            sent_at = time.monotonic()
            request = ProbeRequest(
                sender=me, reply_to=address, frames=frames, frame_bytes=frame_bytes
            )
            transport.send(source, request)
            await _wait(train.done, timeout_s)
            results[source] = estimate(sent_at, train.arrivals, frames, frame_bytes, timeout_s)
            transport.disconnect(source, goodbye=True)
    finally:
        await transport.close()
    return results


async def _wait(event: asyncio.Event, timeout_s: float) -> bool:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout_s)
    return event.is_set()
