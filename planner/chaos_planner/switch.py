"""When a new topology or plan takes effect: a step boundary far enough in the future."""

from __future__ import annotations

import math

MIN_MARGIN_S = 0.010
"""Lower bound on the safety margin added to the announcement's travel time."""

STEPS_WITHOUT_TIMING = 15
"""How far ahead to switch while no step duration has been measured yet."""


def switch_step(current_step: int, mean_step_s: float, rtt_s: float) -> int:
    """The first step boundary every member can learn of in time (the prototype's rule).

    An announcement sent now reaches everybody within about one round trip, padded by 20%
    (`r' = 1.2 * rtt`), plus a margin `e = max(r', 10 ms)` for jitter and processing. That
    much wall time covers `ceil((r' + e) / mean_step_s)` steps at the current pace; two more
    steps absorb the step in progress and a step that runs faster than the mean, so no
    member has already passed the boundary when the announcement arrives and all switch
    at the same step. Without a step time (`mean_step_s <= 0`) switch 15 steps ahead.
    Example: 200 ms steps, 2 ms RTT -> current + 3; 5 ms steps -> current + 5.
    """
    if current_step < 0:
        raise ValueError(f"current_step must be >= 0, got {current_step}")
    if not (math.isfinite(mean_step_s) and math.isfinite(rtt_s)) or rtt_s < 0:
        raise ValueError(f"need finite times and rtt_s >= 0, got {mean_step_s=}, {rtt_s=}")
    if mean_step_s <= 0:
        return current_step + STEPS_WITHOUT_TIMING
    padded_rtt = 1.2 * rtt_s
    margin = max(padded_rtt, MIN_MARGIN_S)
    # Round to 9 decimals first so that an exact multiple does not tip over by a float ulp.
    steps_in_flight = math.ceil(round((padded_rtt + margin) / mean_step_s, 9))
    return current_step + steps_in_flight + 2
