"""Prometheus metrics of one worker, in a registry of its own (never the global one).

Identity: the metrics carry no `worker` label. Prometheus attaches target labels (`instance`,
and whatever the scrape configuration or Kubernetes service discovery adds, e.g. a `member`
label from a pod label) to every series of a target, which is the recommended way to say
whose metrics these are; `chaos_member_info{member}` = 1 maps a target to its member id for
joins when service discovery cannot. Link metrics are the exception: a link has two ends,
so they carry `src` (always this member) and `dst`, and `chaos_link_rtt_seconds` over all
targets is the RTT matrix without any join.

All times are in seconds, sizes in bytes, rates per second (Prometheus base units).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from chaos_worker.net.bounds import REASONS
from chaos_worker.net.tls import HANDSHAKE_REASONS
from chaos_worker.telemetry.exporter import STEP_BUCKETS, Exporter
from chaos_worker.telemetry.linktable import LinkReading, LinkTable

EVENT_BUCKETS = STEP_BUCKETS
SCALE_OUT_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
EVENT_TYPES = frozenset({"join", "leave", "crash", "link_down", "link_up", "reset"})
EVICTION_REASONS = frozenset({"removed", "no_decision"})
DIRECTIONS = frozenset({"sent", "received"})
MAX_REASON = 256
"""Longest reason label of `chaos_checkpoint_skipped_info` (characters)."""


class _LinkCollector(Collector):
    """Link gauges rendered at scrape time from the last `update_links` snapshot.

    A snapshot replaces the previous one whole, so links that are gone or whose figure went
    stale disappear from the output instead of lingering with their last value.
    """

    def __init__(self) -> None:
        self.rows: tuple[LinkReading, ...] = ()

    def describe(self) -> Iterable[Metric]:
        return self._families(())

    def collect(self) -> Iterable[Metric]:
        return self._families(self.rows)

    @staticmethod
    def _families(rows: Iterable[LinkReading]) -> list[Metric]:
        bandwidth = GaugeMetricFamily(
            "chaos_link_bandwidth_bytes_per_second",
            "Measured bandwidth from src to dst (EWMA of probes and transfers of 64 KiB or "
            "more); absent while no fresh measurement exists.",
            labels=["src", "dst"],
        )
        rtt = GaugeMetricFamily(
            "chaos_link_rtt_seconds",
            "Round-trip time from src to dst and back (EWMA of ping/pong); absent while no "
            "fresh measurement exists.",
            labels=["src", "dst"],
        )
        age = GaugeMetricFamily(
            "chaos_link_measurement_age_seconds",
            "Time since the figure (rtt or bandwidth) of the link was last measured; stale "
            "figures are listed here but not exported as values.",
            labels=["src", "dst", "figure"],
        )
        for row in rows:
            age.add_metric([row.src, row.dst, row.kind], row.age_s)
            if row.stale:
                continue
            family = bandwidth if row.kind == "bandwidth" else rtt
            family.add_metric([row.src, row.dst], row.value)
        return [bandwidth, rtt, age]


class WorkerMetrics(Exporter):
    """The metrics one worker exports; the runtime calls the `observe_*`/`add_*` methods."""

    def __init__(self, member: str, *, version: str | None = None) -> None:
        super().__init__()
        self.member = member
        r = self.registry
        self.step_duration = Histogram(
            "chaos_step_duration_seconds",
            "Wall time of one completed training step on this worker (compute and all-reduce).",
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.loss = Gauge("chaos_train_loss", "Loss of the last completed step.", registry=r)
        self.samples = Counter(
            "chaos_train_samples",
            "Samples this worker computed gradients for (sum over workers: all samples).",
            registry=r,
        )
        self.steps = Counter(
            "chaos_train_steps", "Training steps this worker completed.", registry=r
        )
        self.members = Gauge(
            "chaos_members", "Members in the view of the last completed step.", registry=r
        )
        self.step = Gauge(
            "chaos_train_step", "Number of the last training step completed here.", registry=r
        )
        self.events = Counter(
            "chaos_membership_events",
            "Membership decisions applied on this worker, by cause type.",
            ["type"],
            registry=r,
        )
        self.evictions = Counter(
            "chaos_evictions",
            "Times this worker was removed from the job while alive (suspected while slow or "
            "cut off) and went back to asking to be admitted again, by reason.",
            ["reason"],
            registry=r,
        )
        self.event_handling = Histogram(
            "chaos_event_handling_seconds",
            "From the detection of a membership event to its decision being applied here.",
            ["type"],
            buckets=EVENT_BUCKETS,
            registry=r,
        )
        self.scale_out = Histogram(
            "chaos_scale_out_duration_seconds",
            "From a newcomer's join request to its first completed step.",
            buckets=SCALE_OUT_BUCKETS,
            registry=r,
        )
        self.stall = Counter(
            "chaos_incumbent_stall_seconds",
            "Time this running worker lost waiting for membership changes (e.g. a join).",
            registry=r,
        )
        self.replication = Counter(
            "chaos_replication_bytes",
            "Training-state bytes replicated to or from a peer.",
            ["peer", "direction"],
            registry=r,
        )
        self.rejected = Counter(
            "chaos_rejected_messages",
            "Messages from peers refused and dropped alone (the link goes on), by reason: "
            "oversize, malformed, nonfinite, stale, unexpected, forged.",
            ["reason"],
            registry=r,
        )
        for reason in REASONS:
            self.rejected.labels(reason)
        self.refused_handshakes = Counter(
            "chaos_refused_handshakes",
            "TLS handshakes of peers this worker refused (trainer and replicator), by reason: "
            "unknown_ca, expired, bad_name, no_certificate, other.",
            ["reason"],
            registry=r,
        )
        for reason in HANDSHAKE_REASONS:
            self.refused_handshakes.labels(reason)
        self.checkpoint_step = Gauge(
            "chaos_checkpoint_step",
            "Step of the newest checkpoint this worker wrote or resumed from (-1: none).",
            registry=r,
        )
        self.checkpoint_step.set(-1)
        self.resumed_step = Gauge(
            "chaos_checkpoint_resumed_step",
            "Step this initial member resumed from (0: started afresh; -1: did not resume).",
            registry=r,
        )
        self.resumed_step.set(-1)
        self.skipped = Gauge(
            "chaos_checkpoint_skipped_info",
            "A newer checkpoint passed over at resume because it did not verify (always 1).",
            ["checkpoint", "reason"],
            registry=r,
        )
        self.add_build_info("worker", version)
        Gauge(
            "chaos_member_info",
            "Member id of this worker (always 1); join on the target labels.",
            ["member"],
            registry=r,
        ).labels(member).set(1)
        self._links = _LinkCollector()
        r.register(self._links)

    # ------------------------------------------------------------------ runtime hooks

    def observe_step(
        self, duration_s: float, loss: float, samples: int, members: int, step: int = -1
    ) -> None:
        """One completed step: its duration, loss, this worker's samples, the view's size
        and (if known) its number."""
        if step >= 0:
            self.step.set(step)
        self.step_duration.observe(duration_s)
        self.loss.set(loss)
        self.samples.inc(samples)
        self.steps.inc()
        self.members.set(members)

    def observe_event(self, type: str, handling_s: float) -> None:
        """A membership decision caused by an event of `type` was applied here."""
        label = type if type in EVENT_TYPES else "other"
        self.events.labels(label).inc()
        if math.isfinite(handling_s) and handling_s >= 0:
            self.event_handling.labels(label).observe(handling_s)

    def observe_eviction(self, reason: str) -> None:
        """This worker was removed while alive: `removed` from a view, or took itself out
        when `no_decision` reached it."""
        self.evictions.labels(reason if reason in EVICTION_REASONS else "removed").inc()

    def observe_rejected(self, reason: str, count: int = 1) -> None:
        """`count` messages from peers were refused for `reason` (`net.bounds.REASONS`)."""
        self.rejected.labels(reason).inc(count)

    def observe_refused_handshake(self, reason: str, count: int = 1) -> None:
        """`count` TLS handshakes were refused for `reason` (`net.tls.HANDSHAKE_REASONS`)."""
        self.refused_handshakes.labels(reason).inc(count)

    def observe_resumed(self, step: int, skipped: Iterable[str]) -> None:
        """This initial member resumed from the checkpoint of `step` (0: none was sound),
        passing over `skipped` (`"<checkpoint>: <why>"` each)."""
        self.resumed_step.set(step)
        if step > 0:  # the state holds steps 0 .. step - 1
            self.checkpoint_step.set(step)
            self.step.set(step - 1)
        for entry in skipped:
            name, _, why = entry.partition(": ")
            self.skipped.labels(name, why[:MAX_REASON]).set(1)

    def observe_scale_out(self, seconds: float) -> None:
        self.scale_out.observe(seconds)

    def add_stall(self, seconds: float) -> None:
        self.stall.inc(seconds)

    def add_replication_bytes(self, peer: str, direction: str, n: int) -> None:
        """`n` bytes of training state `sent` to or `received` from `peer`."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {sorted(DIRECTIONS)}, got {direction!r}")
        self.replication.labels(peer, direction).inc(n)

    def update_links(self, linktable: LinkTable, now: float | None = None) -> None:
        """Publish this member's link figures (rows with `src` = this member)."""
        now = time.monotonic() if now is None else now
        self._links.rows = tuple(r for r in linktable.readings(now) if r.src == self.member)
