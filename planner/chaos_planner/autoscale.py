"""Autoscaling policy: how many workers a party should run, from its measured scaling curve.

Pure: no I/O and no clock. The caller passes `now` (seconds on any clock, the same one as the
observations' `at` and `last_decision_at`), what it measured and what the cluster admits, and
gets a `ScaleDecision`: the desired replica count, a short machine reason and a message with the
numbers.

The curve is the job's goodput T(n) (samples/s) measured at n workers: the median of the
recent observations at each count (older than `memory_s` are forgotten). The **marginal
goodput** of the n-th worker is what the last step up the curve added per worker,
`m(n) = (T(n) - T(j)) / (n - j)` with `j` the largest measured count below `n` (`T(0) = 0`,
so without a lower measurement `m(n)` is the average `T(n) / n`).

Rules, first match wins:

1. Outside `[min, max]`: go to the nearest bound (`BelowMinimum`, `AboveMaximum`).
2. At zero replicas (only when min is 0): stay (`AtMinimum`); nothing can be measured.
3. A pod of the job is unschedulable: stay (`CapacityExhausted`); other pods still
   pending: stay (`PodsPending`). Never decide while the count is in flux.
4. Within `cooldown_s` of the last decision: stay (`Cooldown`).
5. Fewer than `min_observations` measurements at the current count: stay (`Measuring`).
6. `m(n) < target * (1 - tolerance)`: one worker fewer (`MarginalGoodputBelowTarget`), or
   stay at the minimum (`AtMinimum`). Adding workers no longer pays, e.g. network-bound.
7. The next worker is expected to add at least `target`: one worker more
   (`GoodputAboveTarget`) unless at the maximum (`AtMaximum`) or the namespace quota admits
   no further pod (`CapacityExhausted`). The expectation is the measured `m(n + 1)` when
   `n + 1` workers were measured, else `m(n)` (the last added worker paid, try one more).
8. Otherwise stay (`OnTarget`).

Hysteresis: up needs `>= target`, down needs `< target * (1 - tolerance)`; and a count that was
measured not to pay is not tried again while its measurement is remembered. On a concave
curve (diminishing returns) this changes direction at most once: it climbs while workers
pay, overshoots by one, steps back and stays.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

Reason = Literal[
    "GoodputAboveTarget",
    "MarginalGoodputBelowTarget",
    "OnTarget",
    "AtMaximum",
    "AtMinimum",
    "CapacityExhausted",
    "PodsPending",
    "Cooldown",
    "Measuring",
    "BelowMinimum",
    "AboveMaximum",
]

Finite = Annotated[float, Field(allow_inf_nan=False)]
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Count = Annotated[StrictInt, Field(ge=0)]


class Observation(BaseModel):
    """The job's goodput measured while `workers` workers trained, at time `at`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    workers: Annotated[StrictInt, Field(ge=1)]
    samples_per_s: NonNegative
    at: Finite


class AutoscaleInput(BaseModel):
    """Everything the policy looks at (see the module docstring for the rules)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_replicas: Count
    max_replicas: Annotated[StrictInt, Field(ge=1)]
    replicas: Count
    target_per_worker: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    now: Finite
    cooldown_s: NonNegative = 60.0
    last_decision_at: Finite | None = None
    observations: tuple[Observation, ...] = ()
    pods_pending: bool = False
    """Some pod of the job exists but is not running yet."""
    unschedulable: bool = False
    """Some pending pod of the job cannot be scheduled (the cluster is full)."""
    quota_headroom: Count | None = None
    """How many more pods the namespace's quotas admit; None: no quota limits them."""
    tolerance: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] = 0.1
    min_observations: Annotated[StrictInt, Field(ge=1)] = 2
    memory_s: Annotated[float, Field(gt=0)] = 3600.0

    @model_validator(mode="after")
    def _bounds(self) -> AutoscaleInput:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas must not exceed max_replicas, got {self.min_replicas} > "
                f"{self.max_replicas}"
            )
        return self


class ScaleDecision(BaseModel):
    """Desired replicas, why (a machine reason and a message with the numbers)."""

    model_config = ConfigDict(frozen=True)

    replicas: int
    reason: Reason
    message: str
    goodput: float | None = None
    """Median measured goodput at the current count (samples/s), if measured."""
    marginal: float | None = None
    """Marginal goodput of the current count's last worker (samples/s), if measured."""


def scaling_curve(
    observations: Iterable[Observation], now: float, memory_s: float
) -> dict[int, list[float]]:
    """The remembered measurements per worker count (oldest forgotten)."""
    curve: dict[int, list[float]] = defaultdict(list)
    for obs in observations:
        if now - obs.at <= memory_s:
            curve[obs.workers].append(obs.samples_per_s)
    return dict(curve)


def marginal_goodput(goodput: dict[int, float], workers: int) -> float | None:
    """m(n): what each worker above the largest measured count below n added (T(0) = 0)."""
    if workers not in goodput:
        return None
    below = max((n for n in goodput if n < workers), default=0)
    return (goodput[workers] - goodput.get(below, 0.0)) / (workers - below)


def decide(given: AutoscaleInput) -> ScaleDecision:
    """The desired replica count for `given` (rules in the module docstring)."""
    n, low, high = given.replicas, given.min_replicas, given.max_replicas
    target = given.target_per_worker
    if n < low:
        return ScaleDecision(replicas=low, reason="BelowMinimum",
                        message=f"{n} replicas is below minReplicas {low}")  # fmt: skip
    if n > high:
        return ScaleDecision(replicas=high, reason="AboveMaximum",
                        message=f"{n} replicas is above maxReplicas {high}")  # fmt: skip
    if n == 0:
        return ScaleDecision(replicas=0, reason="AtMinimum",
                        message="no workers run, so none can be measured")  # fmt: skip

    curve = scaling_curve(given.observations, given.now, given.memory_s)
    goodput = {k: statistics.median(v) for k, v in curve.items()}
    here = goodput.get(n)
    m = marginal_goodput(goodput, n)

    def keep(reason: Reason, message: str) -> ScaleDecision:
        return ScaleDecision(replicas=n, reason=reason, message=message, goodput=here, marginal=m)

    def move(to: int, reason: Reason, message: str) -> ScaleDecision:
        return ScaleDecision(replicas=to, reason=reason, message=message, goodput=here, marginal=m)

    if given.unschedulable:
        return keep("CapacityExhausted", "a worker pod cannot be scheduled; waiting for capacity")
    if given.pods_pending:
        return keep("PodsPending", "worker pods are starting or stopping")
    if given.last_decision_at is not None:
        waited = given.now - given.last_decision_at
        if waited < given.cooldown_s:
            return keep(
                "Cooldown",
                f"last decision {waited:.0f}s ago; next in {given.cooldown_s - waited:.0f}s "
                f"(cooldown {given.cooldown_s:g}s)",
            )
    measured = len(curve.get(n, ()))
    if here is None or m is None or measured < given.min_observations:
        return keep(
            "Measuring",
            f"{measured} of {given.min_observations} goodput measurements with {n} workers",
        )

    at = f"goodput {here:.1f} samples/s with {n} workers"
    if m < target * (1 - given.tolerance):
        why = f"{at}; the last worker added {m:.1f} samples/s, below the target {target:g}"
        if n <= low:
            return keep("AtMinimum", f"{why}, but minReplicas is {low}")
        return move(n - 1, "MarginalGoodputBelowTarget", f"{why}: removing one")

    m_next = marginal_goodput(goodput, n + 1)
    expected = m if m_next is None else m_next
    basis = (
        f"the last worker added {m:.1f} samples/s"
        if m_next is None
        else f"{n + 1} workers were measured to add {m_next:.1f} samples/s each"
    )
    if expected >= target:
        why = f"{at}; {basis}, at least the target {target:g}"
        if n >= high:
            return keep("AtMaximum", f"{why}, but maxReplicas is {high}")
        if given.quota_headroom is not None and given.quota_headroom <= 0:
            return keep("CapacityExhausted", f"{why}, but the namespace quota admits no more pods")
        return move(n + 1, "GoodputAboveTarget", f"{why}: adding one")
    return keep("OnTarget", f"{at}; {basis}, below the target {target:g}: staying")
