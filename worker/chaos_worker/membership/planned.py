"""Planned decisions agreed and not yet in force, in epoch order.

The root decides the next planned change only once it installed the last one, so a member
still short of one decision's step may already hold the next: both are kept and installed
in turn. A paused member takes a state copy rather than the steps in between, so for it a
later decision replaces the others until one admits it (joins it); that one is kept, since the state
it is sent is for that decision, and the later ones queue after it.
"""

from __future__ import annotations

from chaos_worker.membership.rules import joining
from chaos_worker.net.wire import Decision


class Planned:
    """The queue of planned decisions of one member."""

    def __init__(self) -> None:
        self._queue: list[Decision] = []

    @property
    def next(self) -> Decision | None:
        """The next decision to take effect, if any."""
        return self._queue[0] if self._queue else None

    def all(self) -> list[Decision]:
        return list(self._queue)

    def admits(self, member: str) -> bool:
        """Whether a queued decision joins `member` (a cause of it admits `member`): one
        that takes a state copy keeps the first such (the state it is sent is for that
        one) and the later ones after it. A decision that merely holds a paused member,
        agreed before it was paused, admits it no more: it has no state for its step."""
        return any(member in joining(d) for d in self._queue)

    def add(self, decision: Decision, *, replace: bool) -> None:
        """Queue `decision` after the others (`replace`: instead of them). One no later
        than the last queued is a duplicate of another root's and is dropped."""
        if replace or not self._queue:
            self._queue = [decision]
        elif decision.view.epoch > self._queue[-1].view.epoch:
            self._queue.append(decision)

    def drop_through(self, epoch: int) -> None:
        """Forget decisions of `epoch` or earlier: a view of that epoch is in force."""
        self._queue = [d for d in self._queue if d.view.epoch > epoch]

    def clear(self) -> None:
        self._queue = []
