"""Emulated WAN links on loopback: token-bucket rate limits and added one-way delay.

`chaos run --links` and the benchmarks give links a rate and a delay, e.g.
`w0-w3=20MB/s+40ms,*=100MB/s` (an undirected pair or `*` for every other link; the rate
applies to each direction separately). The transport waits for tokens before writing each
piece of a frame and holds a frame until its delay has passed since it was queued, so FIFO
order is kept. With `chaos run --netns` the rates are shaped by `tc` between network
namespaces (`chaos_cli.local.netns`) and the transport only adds the delays (`delays_only`).
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass

_UNITS = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "KI": 1 << 10, "MI": 1 << 20, "GI": 1 << 30}
_RATE = re.compile(r"^(?P<num>\d+(?:\.\d+)?)(?P<unit>[KMG]i?)?B/s$", re.IGNORECASE)
_DELAY = re.compile(r"^(?P<num>\d+(?:\.\d+)?)ms$")
_PAIR = re.compile(r"^(?:\*|[A-Za-z0-9_.]+-[A-Za-z0-9_.]+)$")


class ShapeError(ValueError):
    """A link specification that does not parse."""


@dataclass(frozen=True)
class LinkShape:
    """Rate in bytes/s (None: unlimited) and added one-way delay of one direction of a link."""

    rate_bytes_per_s: float | None = None
    delay_s: float = 0.0


PIECE = 1 << 20
"""The largest piece of a payload moved at once: written at once, or waiting for a shaped
link's tokens."""


class TokenBucket:
    """Bytes may pass at `rate` per second on average, in bursts of at most `burst` bytes."""

    def __init__(self, rate_bytes_per_s: float, burst: int | None = None) -> None:
        if rate_bytes_per_s <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate_bytes_per_s)
        # default: 20 ms worth of bytes, between 1 KiB and 4 MiB: enough that a sender
        # woken a few milliseconds late (a busy machine) does not lose the link's rate
        self.burst = float(burst or min(4 << 20, max(1 << 10, int(self.rate / 50))))
        self._tokens = self.burst
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()

    @property
    def piece(self) -> int:
        """The largest piece of a payload that waits for tokens at once (a burst at most)."""
        return min(PIECE, int(self.burst))

    def _refill(self, now: float) -> None:
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def wait_s(self, nbytes: int, now: float) -> float:
        """Seconds until `nbytes` may pass, taking them now (the balance may go negative)."""
        self._refill(now)
        self._tokens -= nbytes
        return max(0.0, -self._tokens / self.rate)

    async def consume(self, nbytes: int) -> None:
        """Wait until `nbytes` may pass; concurrent callers are served in turn."""
        async with self._lock:
            delay = self.wait_s(nbytes, time.monotonic())
            if delay > 0:
                await asyncio.sleep(delay)


def parse_rate(text: str) -> float:
    """`25MB/s`, `1.5GiB/s`, `800KB/s` -> bytes per second."""
    match = _RATE.match(text.strip())
    if not match:
        raise ShapeError(f"{text!r} is not a rate such as 25MB/s or 1GiB/s")
    value = float(match["num"]) * _UNITS[(match["unit"] or "").upper()]
    if value <= 0:
        raise ShapeError(f"rate {text!r} must be positive")
    return value


def parse_shape(text: str) -> LinkShape:
    """`25MB/s`, `25MB/s+40ms` or `+40ms` -> LinkShape."""
    if not text.strip():
        raise ShapeError("empty shape; give a rate such as 25MB/s, a delay such as +40ms, or both")
    rate_text, _, delay_text = text.strip().partition("+")
    rate = parse_rate(rate_text) if rate_text else None
    delay = 0.0
    if delay_text:
        match = _DELAY.match(delay_text.strip())
        if not match:
            raise ShapeError(f"{delay_text!r} is not a delay such as 40ms")
        delay = float(match["num"]) / 1000
    return LinkShape(rate, delay)


def parse_links(spec: str) -> dict[str, LinkShape]:
    """`a-b=RATE[+DELAY],...,*=RATE` -> {'a|b' (sorted) or '*': LinkShape}; '' or none: {}."""
    spec = spec.strip()
    if spec in ("", "none"):
        return {}
    shapes: dict[str, LinkShape] = {}
    for item in spec.split(","):
        pair, eq, shape = item.strip().partition("=")
        if not eq or not _PAIR.match(pair):
            raise ShapeError(
                f"--links: {item.strip()!r} is not PAIR=RATE[+DELAY], e.g. w0-w1=20MB/s"
            )
        try:
            parsed = parse_shape(shape)
        except ShapeError as exc:
            raise ShapeError(f"--links: {item.strip()!r}: {exc}") from None
        shapes[pair if pair == "*" else "|".join(sorted(pair.split("-")))] = parsed
    return shapes


def shape_for(shapes: dict[str, LinkShape], a: str, b: str) -> LinkShape:
    """The shape of the link between `a` and `b`: its own entry, else `*`, else unshaped."""
    return shapes.get("|".join(sorted((a, b))), shapes.get("*", LinkShape()))


def delays_only(shapes: dict[str, LinkShape]) -> dict[str, LinkShape]:
    """The same links without their rates (rates enforced elsewhere, e.g. by tc)."""
    return {pair: LinkShape(None, shape.delay_s) for pair, shape in shapes.items()}
