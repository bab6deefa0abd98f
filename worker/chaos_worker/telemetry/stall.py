"""Time a running member loses to membership changes, measured on its own steps (pure).

The same definition as the run report's `incumbent_stall_s` (`lost_time`, below): the
steps completed from the start of a change (a join plan, a decision taken in, an abort) up
to `window` steps after its view is installed took this much longer than as many typical
steps (the median of the gaps between this member's completed steps before the change).
Fast and slow steps cancel, so jitter alone does not count; the result is at least 0.
"""

from __future__ import annotations

import statistics
from collections import deque


class StallMeter:
    """Feed it step completions and change boundaries; it returns each change's loss."""

    def __init__(self, window: int = 3, history: int = 20) -> None:
        self.window = window
        self._history: deque[float] = deque(maxlen=history)
        self._last: float | None = None
        self._open = False
        self._gaps: list[float] = []
        self._after_install: int | None = None

    def change_started(self) -> None:
        """A membership change began: the gaps of the next completed steps count."""
        if not self._open:
            self._open, self._gaps, self._after_install = True, [], None

    def change_installed(self) -> None:
        """The change's view is in force: `window` more steps, then the change is over."""
        if self._open:
            self._after_install = 0

    def step_done(self, now: float) -> float | None:
        """A step completed at `now`; the time lost when this closes a change, else None."""
        gap = None if self._last is None else now - self._last
        self._last = now
        if gap is None:
            return None
        if not self._open:
            self._history.append(gap)
            return None
        self._gaps.append(gap)
        if self._after_install is None:
            return None
        self._after_install += 1
        if self._after_install < self.window:
            return None
        self._open = False
        if not self._history:  # no typical step yet (a newcomer): nothing to compare with
            return None
        return lost_time(self._gaps, statistics.median(self._history))


def lost_time(gaps: list[float], typical: float) -> float:
    """Time steps lost against `typical` (the median step): the excess of their gaps over as
    many typical steps, at least 0. Shared by the report and the workers' stall metric."""
    return max(0.0, sum(gap - typical for gap in gaps))
