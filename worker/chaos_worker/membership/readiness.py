"""When a pulling newcomer switches in (pure, no I/O).

A newcomer that asked for its switch step `T` only once its pull was over would then wait
for the root's next decision and the step boundary after it, with its state loaded. It asks
instead while the last shards are still arriving, once what is left (the pull's predicted
remainder, then loading the state) fits in `LEAD` step periods, and says how long that is
(`ready_in`). The root takes the first step boundary that its own step clock puts after that
(`switch_steps`), never earlier than the decision can reach everybody. A pull that runs
later than predicted makes the members wait for the newcomer in step `T`'s all-reduce, by
as much: the stall that the join reports.

The newcomer's period is its own measurement: the root streams it every step's reduced
total, so their arrivals tick at the job's step rate.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence

from chaos_worker.net.wire import Decision

LEAD = 1.0
"""Ask once the remaining pull and load fit in this many step periods."""
SLACK = 1.1
"""`ready_in` over-estimates the predicted remainder by this factor..."""
SLACK_S = 0.003
"""...plus this much, for the checks of the last shards and a busy host."""
LOAD_BYTES_PER_S = 5e9
"""Loading a pulled snapshot copies what the model cannot take as views: a memory copy."""
LOAD_FIXED_S = 0.005
"""Loading's fixed part (building tensors, replaying the observed steps)."""
MIN_ARRIVALS = 3
MAX_EXTRA_STEPS = 50
"""A switch is never put off further than this for a slow pull."""


def step_period(arrivals: Sequence[float]) -> float | None:
    """The median gap between the observed totals' arrivals; None until there are enough."""
    if len(arrivals) < MIN_ARRIVALS:
        return None
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    return statistics.median(gaps)


def ready_in(remaining_s: float, load_bytes: int) -> float:
    """Seconds until a newcomer with `remaining_s` of pull left holds a loaded state, when
    loading copies `load_bytes` (`snapshot.copied_by_load`)."""
    load_s = LOAD_FIXED_S + load_bytes / LOAD_BYTES_PER_S
    return SLACK * (remaining_s + load_s) + SLACK_S


def ask_now(remaining_s: float, load_bytes: int, period_s: float | None) -> bool:
    """True when a newcomer with `remaining_s` of pull left should ask for its switch step."""
    if period_s is None:
        return False
    return ready_in(remaining_s, load_bytes) <= LEAD * period_s


def switch_steps(
    now: float, step_started: float, period_s: float | None, wait_s: float, minimum: int
) -> int:
    """How many steps after the current one (started at `step_started`) a switch takes
    effect: at least `minimum`, and the first boundary at or after `now + wait_s` as the
    root's step period `period_s` predicts (None: `minimum`)."""
    if period_s is None or period_s <= 0 or wait_s <= 0:
        return minimum
    due = now + wait_s
    steps = max(minimum, math.ceil((due - step_started) / period_s))
    return min(steps, minimum + MAX_EXTRA_STEPS)


def switch_decision(current: Decision | None, decision: Decision, me: str) -> Decision | None:
    """The decision a newcomer `me` switches in at, once `decision` has arrived, when it
    followed `current` so far. The first planned view that admits it wins: the members
    expect it from that view's step on, and a later planned view (another join decided
    right after) follows it as for any member (`Membership`'s queue of planned views).
    Switching in at the later one instead left the members waiting for its contribution
    to the first one's steps, and it waiting for theirs: a deadlock. A recovery (an
    immediate decision) that admits it replaces `current`; one of at least `current`'s
    epoch that leaves it out voids `current` (the members drop that planned view too; the
    root then decides the join again)."""
    epoch = -1 if current is None else current.view.epoch
    if me in decision.view.members and decision.view.epoch > epoch:
        return decision if current is None or decision.immediate else current
    if current is not None and decision.immediate and decision.view.epoch >= epoch:
        return None
    return current
