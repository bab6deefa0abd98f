"""What the operator reads from its members' `/metrics`, and the figures derived from it.

`scrape_members` is the only I/O here (one GET per running member); everything else is pure:
`parse_metrics` turns an exposition into a `MemberMetrics`, `latest_step`, `scale_out_delay`,
`durable_reading` and `measure_goodput` combine the members' readings.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from chaos_operator.durable import DurableReading
from chaos_operator.pods import ANN_METRICS
from chaos_operator.reconcile import ObservedPod


@dataclass(frozen=True)
class MemberMetrics:
    """One member's figures at one scrape (`at`: the operator's monotonic clock, seconds)."""

    at: float
    step: int | None = None
    """`chaos_train_step`: the last step this member completed."""
    samples_total: float | None = None
    """`chaos_train_samples_total`: samples this member computed gradients for."""
    members: int | None = None
    """`chaos_members`: members in the view of its last completed step."""
    scale_out_sum: float = 0.0
    scale_out_count: float = 0.0
    """`chaos_scale_out_duration_seconds` sum and count: this member's own joins."""
    checkpoint_step: int | None = None
    """`chaos_checkpoint_step`: the newest checkpoint it wrote or resumed from."""
    resumed_step: int | None = None
    """`chaos_checkpoint_resumed_step`: the step it resumed at (0: afresh)."""
    skipped: tuple[str, ...] = ()
    """`chaos_checkpoint_skipped_info`: `<checkpoint>: <why>` of each one it passed over."""


def parse_metrics(text: str, at: float) -> MemberMetrics:
    """The figures in a Prometheus text exposition; ValueError if it is not one."""
    values: dict[str, float] = {}
    skipped: list[str] = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.labels:
                values[sample.name] = sample.value
            elif sample.name == "chaos_checkpoint_skipped_info" and sample.value == 1:
                labels = sample.labels
                skipped.append(f"{labels.get('checkpoint', '?')}: {labels.get('reason', '')}")
    step = values.get("chaos_train_step")
    members = values.get("chaos_members")
    return MemberMetrics(
        at=at,
        step=None if step is None else int(step),
        samples_total=values.get("chaos_train_samples_total"),
        members=None if members is None else int(members),
        scale_out_sum=values.get("chaos_scale_out_duration_seconds_sum", 0.0),
        scale_out_count=values.get("chaos_scale_out_duration_seconds_count", 0.0),
        checkpoint_step=_step(values.get("chaos_checkpoint_step")),
        resumed_step=_step(values.get("chaos_checkpoint_resumed_step")),
        skipped=tuple(sorted(skipped, reverse=True)),
    )


def _step(value: float | None) -> int | None:
    """A step gauge's value; None when absent or negative (none)."""
    return None if value is None or value < 0 else int(value)


def scrape_members(pods: Iterable[ObservedPod], timeout_s: float) -> dict[str, MemberMetrics]:
    """The figures of every running member that answers, by pod name."""
    out: dict[str, MemberMetrics] = {}
    for pod in pods:
        port = pod.annotations.get(ANN_METRICS)
        if not pod.ip or not port or pod.phase != "Running" or pod.deleting:
            continue
        try:
            with urllib.request.urlopen(f"http://{pod.ip}:{port}/metrics", timeout=timeout_s) as r:
                text = r.read().decode()
            out[pod.name] = parse_metrics(text, time.monotonic())
        except (OSError, ValueError):
            continue
    return out


def latest_step(scrapes: Iterable[MemberMetrics]) -> int | None:
    """The latest step any member completed, if any reported one."""
    return max((m.step for m in scrapes if m.step is not None), default=None)


def durable_reading(scrapes: Iterable[MemberMetrics]) -> DurableReading:
    """What the members said of the checkpoints: the newest one, and where the resumed
    writer started and what it skipped (only the writer reports any of it)."""
    readings = list(scrapes)
    newest = max(
        (m.checkpoint_step for m in readings if m.checkpoint_step is not None), default=None
    )
    resumed = [m for m in readings if m.resumed_step is not None]
    if not resumed:
        return DurableReading(newest)
    first = max(resumed, key=lambda m: m.resumed_step or 0)
    return DurableReading(newest, first.resumed_step, first.skipped)


def scale_out_delay(
    scrapes: Mapping[str, MemberMetrics], newest_first: Sequence[str]
) -> float | None:
    """Seconds the newest member that joined took to join (mean of its own histogram)."""
    for name in newest_first:
        m = scrapes.get(name)
        if m is not None and m.scale_out_count > 0:
            return m.scale_out_sum / m.scale_out_count
    return None


def view_settled(readings: Iterable[MemberMetrics | None], members: int) -> bool:
    """Every reading is there and shows the same view of at least `members` members.

    A member that is still joining (an observer) or a view that changed between readings
    fails this: the figures would mix two worker counts.
    """
    views = {None if m is None else m.members for m in readings}
    view = views.pop() if len(views) == 1 else None
    return view is not None and view >= members


def measure_goodput(
    before: Mapping[str, MemberMetrics],
    after: Mapping[str, MemberMetrics],
    running: Iterable[str],
) -> float | None:
    """The job's samples/s between two scrapes of the `running` members, if it is clean.

    Clean: every running member answered both times with the same settled view
    (`view_settled`), and no counter went back (a restart). The goodput is the sum of the
    members' `rate(chaos_train_samples_total)`, each over its own interval.
    """
    names = sorted(running)
    pairs = [(before.get(n), after.get(n)) for n in names]
    if not names or not view_settled([m for pair in pairs for m in pair], len(names)):
        return None
    total = 0.0
    for a, b in pairs:
        assert a is not None and b is not None  # view_settled saw them all
        if a.samples_total is None or b.samples_total is None:
            return None
        if b.at <= a.at or b.samples_total < a.samples_total:
            return None
        total += (b.samples_total - a.samples_total) / (b.at - a.at)
    return total
