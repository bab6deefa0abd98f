"""A member's telemetry: link probes and gossip, step and pull observations, replication
byte counts, and the metrics of applied decisions (`WorkerMetrics`, when exported)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from chaos_worker.net.bounds import REASONS
from chaos_worker.net.tls import HANDSHAKE_REASONS
from chaos_worker.net.wire import Decision, LinkGossip, Ping, Pong
from chaos_worker.ports import Clock, Outbox
from chaos_worker.telemetry.metrics import WorkerMetrics
from chaos_worker.telemetry.probes import LinkMonitor, directed
from chaos_worker.telemetry.stall import StallMeter

log = logging.getLogger(__name__)

MAX_GOSSIP_ENTRIES = 256
"""Most link figures in one gossip message (the freshest)."""


class Telemetry:
    """Measures links and steps into `monitor.table`, and counts into `metrics`."""

    def __init__(
        self, me: str, *, outbox: Outbox, clock: Clock, metrics: WorkerMetrics | None
    ) -> None:
        self.me = me
        self.monitor = LinkMonitor(me)
        self.metrics = metrics
        self.stall = StallMeter()
        self.served: Callable[[], dict[str, int]] | None = None
        """What a replicator process (sidecar or child) sent since the last look."""
        self.refused: Callable[[], dict[str, int]] | None = None
        """Requests it refused since the last look, per reason (`net.bounds.REASONS`)."""
        self.refused_handshakes: Callable[[], dict[str, int]] | None = None
        """Handshakes it refused since the last look, per reason (`net.tls`)."""
        self._out = outbox
        self._clock = clock
        self._scale_out_from: float | None = None  # a newcomer's join request, until it steps

    def scale_out_started(self, t: float) -> None:
        """A newcomer asked to join at `t`; its first completed step ends the scale-out."""
        self._scale_out_from = t

    def fresh_links(self, now: float) -> dict[str, dict[str, list[float]]]:
        """The freshest link figures, as sent to a neighbour or with a join proposal."""
        return self.monitor.table.share(now, limit=MAX_GOSSIP_ENTRIES, fresh_only=True)

    def probe_links(
        self, overlay: Iterable[str], down: Iterable[str], members: Iterable[str], step: int
    ) -> None:
        """Start this member's bandwidth probes of the round due at `step` (`probes.py`)."""
        links = directed(overlay, down, members)
        for probe in self.monitor.due(links, step, self._clock()):
            if probe.dst in self._out.peers():
                marker, sent_at = self.monitor.start_pair(probe, self._clock())
                self._out.send(probe.dst, Ping(sender=self.me, sent_at=marker))
                ping = Ping(sender=self.me, sent_at=sent_at)
                self._out.send(probe.dst, ping, bytes(probe.nbytes))

    def on_pong(self, sender: str, pong: Pong, now: float) -> None:
        self.monitor.on_pong(sender, pong.echo, now, gap_s=pong.gap_s)

    def observe_step(
        self, samples: int, compute_s: float, step_s: float, *, loss: float, members: int, step: int
    ) -> None:
        """This member completed `step` with `samples` of its own among `members`."""
        now = self._clock()
        self.monitor.table.observe_step(self.me, samples, compute_s, now)
        lost = self.stall.step_done(now)
        if self.metrics is None:
            return
        if lost is not None:
            self.metrics.add_stall(lost)
        if self._scale_out_from is not None:  # a newcomer's first completed step
            self.metrics.observe_scale_out(now - self._scale_out_from)
            self._scale_out_from = None
        self.metrics.observe_step(step_s, loss, samples, members, step=step)

    def observe_pull(
        self, bytes_per_source: dict[str, int], transfers: dict[str, list[tuple[int, float]]]
    ) -> None:
        """A newcomer's completed pull: bytes received per source, and each source's
        delivery (request to last byte, this clock) as a transfer on its link to us."""
        now = self._clock()
        for source, nbytes in bytes_per_source.items():
            self.count_replication(source, "received", nbytes)
        for source, bursts in transfers.items():
            for nbytes, seconds in bursts:
                self.monitor.table.observe_transfer(source, self.me, nbytes, seconds, now)

    def tick(self, now: float) -> None:
        """Every heartbeat: publish the link figures and count what was served."""
        if self.metrics is not None:
            self.metrics.update_links(self.monitor.table, now)
            self._count_served()

    def _count_served(self) -> None:
        if self.served is not None:
            for peer, nbytes in self.served().items():
                self.count_replication(peer, "sent", nbytes)
        if self.refused is not None:
            for reason, count in self.refused().items():
                if reason in REASONS:  # the file is the replicator's, still checked
                    self.metrics.observe_rejected(reason, count)
        if self.refused_handshakes is not None:
            for reason, count in self.refused_handshakes().items():
                if reason in HANDSHAKE_REASONS:
                    self.metrics.observe_refused_handshake(reason, count)

    def count_replication(self, peer: str, direction: str, nbytes: int) -> None:
        if self.metrics is not None and nbytes:
            self.metrics.add_replication_bytes(peer, direction, nbytes)

    def gossip(self, now: float, neighbours: Iterable[str]) -> None:
        """Send the freshest link figures to the view's neighbours (`LinkGossip`)."""
        links = self.fresh_links(now)
        if not any(links.values()):
            return
        message = LinkGossip(sender=self.me, links=links)
        for peer in neighbours:
            self._out.send(peer, message)

    def merge_links(self, links: dict, accept: Callable[[str, str], bool]) -> None:
        """Take in validated link figures from a peer (the newer measurement wins)."""
        try:
            self.monitor.table.merge(links, self._clock(), accept)
        except ValueError as exc:
            log.warning("ignored link figures: %s", exc)

    def evicted(self, reason: str) -> None:
        """This member was removed while alive (`WorkerMetrics.observe_eviction`)."""
        if self.metrics is not None:
            self.metrics.observe_eviction(reason)

    def observe_decision(self, decision: Decision) -> None:
        """Count the causes of an applied decision; handling time from their detection."""
        if self.metrics is None:
            return
        now = self._clock()
        for cause in decision.causes:
            self.metrics.observe_event(cause.kind, now - cause.detected_at)
