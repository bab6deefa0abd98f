"""What a member's roles share: the outbox they send through, the clock, training progress,
and a change signal. The member (`member.py`) implements the outbox over its transport and
control link; a test passes a recording one.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from chaos_worker.net.wire import WireMessage

Clock = Callable[[], float]
"""Seconds on a monotonic clock (`time.monotonic` outside tests)."""


class Outbox(Protocol):
    """Where a role's messages and reports go. Every call enqueues at once, in the caller's
    turn of the event loop: a decision forwarded inside a message callback therefore
    precedes, on every link, whatever this member sends next (ADR 0001, item 3)."""

    def send(self, peer: str, message: WireMessage, payload: bytes | memoryview = b"") -> bool:
        """Queue `message` on the link to `peer`; False when there is none."""
        ...

    def flood(self, message: WireMessage) -> None:
        """Queue `message` on every link (flooded control messages)."""
        ...

    def report(self, record: str, **fields: Any) -> None:
        """Tell the launcher (and the log) about `record`."""
        ...

    def connect(self, peer: str, address: str) -> None:
        """Open (or keep) the link to `peer` at `address`."""
        ...

    def disconnect(self, peer: str) -> None:
        """Close the link to `peer` after a goodbye."""
        ...

    def peers(self) -> list[str]:
        """Peers with an outgoing link."""
        ...


RATE_WINDOW = 16
"""Steps over which a member's speed is taken (their median)."""


@dataclass
class Progress:
    """Where training stands: written by the trainer (and a newcomer's state load), read
    by the protocol (switch steps, recovery statuses) and the heartbeats."""

    step: int = 0
    """The step in progress, or next to run."""
    completed: int = -1
    """The last step whose total this member applied."""
    started: float = 0.0
    """When `step` began (clock seconds)."""
    samples_per_s: float = 0.0
    """This member's compute speed: the median samples/s of its last steps with samples."""
    rates: deque[float] = field(default_factory=lambda: deque(maxlen=RATE_WINDOW))
    """samples/s of the last steps with samples."""
    step_times: deque[float] = field(default_factory=lambda: deque(maxlen=10))
    """Wall time of the last steps, compute and all-reduce."""

    def computed(self, samples: int, seconds: float) -> None:
        """Record one step's compute. The median over a window, not the last step, is the
        speed the batch is split by and the majority weighed by: one step's figure swings
        several-fold with scheduling, and splits that follow such swings drift the batch
        onto a few members (whose slices amortise the fixed cost of a step, so they then
        measure faster still)."""
        if samples > 0:
            self.rates.append(samples / max(seconds, 1e-6))
            self.samples_per_s = statistics.median(self.rates)

    def period(self) -> float | None:
        """The median step time; None before the first step."""
        return statistics.median(self.step_times) if self.step_times else None


class Signal:
    """Wakes every task waiting for the next `notify()`. A waiter that acts before waiting
    takes `next()` first, so that a change it causes itself is not missed."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    def next(self) -> asyncio.Event:
        """The event the next `notify()` sets."""
        return self._event

    async def wait(self, timeout: float | None = None, *, since: asyncio.Event | None = None):
        """Until the next `notify()` (or the one after `since = next()`), or `timeout`."""
        event = since if since is not None else self._event
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)
