"""Liveness: flooded heartbeats, the failure detector, and answers to link pings.

Every member floods a heartbeat each `heartbeat_interval_s` (its epoch, step, speed and
replicator address) on every link; a member not heard from over any path for
`failure_timeout_s` is suspected crashed (one never heard from gets `STARTUP_TIMEOUT_S`:
it is still starting). A neighbour heard through others but not over its own link for
`LINK_SILENCE` timeouts has a silent link: that link is reported down, and the overlay
routes around it. A member whose own event loop was held gives the others a whole timeout
from when it runs again (`watch`).
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Iterable

from chaos_worker.membership.protocol import Membership
from chaos_worker.membership.seen import SeenIds
from chaos_worker.membership.view import View
from chaos_worker.net.wire import Heartbeat, Ping, Pong
from chaos_worker.ports import Clock, Outbox, Progress, Signal
from chaos_worker.telemetry.telemetry import Telemetry

STARTUP_TIMEOUT_S = 60.0
GOSSIP_EVERY = 10
"""Heartbeats between two link-table gossips to the neighbours (1 s by default)."""
PING_EVERY = 5
"""Heartbeats between two pings of every link."""
LINK_SILENCE = 3.0
"""Failure timeouts a link may carry nothing while its neighbour is heard through others
before it is reported down: a frame arrives whole, and a large one on a slow or congested
link (a 4 MiB bucket at 2 MB/s) keeps a live link quiet for seconds."""
BEAT_MEMORY = 10.0
"""Failure timeouts a heartbeat's id is kept, far longer than a copy of it travels (one
later still would pass for a new beat: harmless)."""


class Liveness:
    """Heartbeats out, heartbeats in, and suspicion of the silent."""

    def __init__(
        self,
        me: str,
        *,
        heartbeat_interval_s: float,
        failure_timeout_s: float,
        membership: Membership,
        telemetry: Telemetry,
        outbox: Outbox,
        progress: Progress,
        clock: Clock,
    ) -> None:
        self.me = me
        self.replicators: dict[str, str] = {}
        """Member -> the address its replicator serves snapshots at (from heartbeats)."""
        self.job_size = 0
        """The largest view size heard in heartbeats (a newcomer's probe waits for it)."""
        self.beats = Signal()
        """Notified at every new heartbeat."""
        self.beats_heard = 0
        """Heartbeats of others taken in (each once): a clock that runs as fast as the job."""
        self._interval = heartbeat_interval_s
        self._timeout = failure_timeout_s
        self._membership = membership
        self._telemetry = telemetry
        self._out = outbox
        self._progress = progress
        self._clock = clock
        self._seq = itertools.count()
        self._seen = SeenIds()  # heartbeat ids, tagged with the second they arrived in
        self._heard: dict[str, float] = {}  # member -> last frame of its, over any path
        self._link_heard: dict[str, float] = {}  # neighbour -> last frame over its link
        self._link_since: dict[str, float] = {}  # neighbour -> when its link was added
        self._cut: set[tuple[int, str]] = set()  # (epoch, neighbour) links reported down
        self._born = clock()
        self._woke = -math.inf  # when the detector last found its own loop had been held
        self._ping_read: dict[str, float] = {}  # peer -> when its last empty Ping was read
        self._steps: dict[str, int] = {}  # member -> the step its latest heartbeat named

    def knows_every_replicator(self) -> bool:
        """Every member of the largest view heard of has named its replicator."""
        return 0 < self.job_size <= len(self.replicators) - 1

    async def heartbeats(self) -> None:
        while True:
            now = self._clock()
            view = self._membership.view
            beat = Heartbeat(
                origin=self.me,
                seq=next(self._seq),
                epoch=view.epoch if view else -1,
                step=self._progress.step,
                samples_per_s=self._progress.samples_per_s,
                sent_at=now,
                replicator=self.replicators.get(self.me, ""),
                members=len(view.members) if view else 0,
            )
            self._out.flood(beat)
            if beat.seq % PING_EVERY == 0:
                for peer in self._out.peers():
                    self._out.send(peer, Ping(sender=self.me, sent_at=now))
            if beat.seq % GOSSIP_EVERY == GOSSIP_EVERY - 1 and view is not None:
                self._telemetry.gossip(now, view.neighbours(self.me))
            self._telemetry.tick(now)
            await asyncio.sleep(self._interval)

    async def watch(self) -> None:
        """Failure detector: members not heard from within the timeout are suspected.

        A look that comes over half a timeout late shows this member's own event loop
        held (a long synchronous stretch, a GC or VM pause): it read nobody meanwhile, and
        their frames still wait in its sockets. Silences then count from that look on
        (`_woke`): taking the others for dead would pause a job that lost nobody."""
        membership = self._membership
        looked = self._clock()
        while True:
            await asyncio.sleep(self._interval / 2)
            now = self._clock()
            if now - looked > self._timeout / 2:
                self._woke = now
            looked = now
            view = membership.view
            if view is None or view.paused:
                continue
            for member in view.members:
                if member == self.me or member in membership.suspects:
                    continue
                if self._silent(member, now):
                    membership.suspect(member, now)
            self._watch_links(view, now)
            if membership.aborting:
                membership.try_decide_recovery(now)

    def _watch_links(self, view: View, now: float) -> None:
        """Report each silent link to a neighbour heard through others (once an epoch).
        A link is judged only once it has carried a frame since it joined the overlay:
        until then the neighbour may still be opening it."""
        neighbours = view.neighbours(self.me)
        for peer in neighbours:
            self._link_since.setdefault(peer, now)
        for peer in set(self._link_since) - set(neighbours):
            del self._link_since[peer]
        if self._membership.aborting:
            return
        for peer in neighbours:
            last = self._link_heard.get(peer)
            if last is None or last < self._link_since[peer] or (view.epoch, peer) in self._cut:
                continue
            quiet = now - max(last, self._woke) > LINK_SILENCE * self._timeout
            if quiet and not self._silent(peer, now):
                self._cut.add((view.epoch, peer))
                self._membership.propose("link_down", self.me, now, peer=peer)

    def _silent(self, member: str, now: float) -> bool:
        """Not heard from (over any path) for longer than the failure timeout. One never
        heard from is still starting (importing torch, loading the job): it gets the
        start-up allowance."""
        last = self._heard.get(member)
        silent = now - (max(last, self._woke) if last is not None else self._born)
        return silent > (self._timeout if last is not None else STARTUP_TIMEOUT_S)

    def silence(self, member: str, now: float) -> float:
        """Seconds since anything was heard from `member` (any path)."""
        last = self._heard.get(member)
        return now - last if last is not None else float("inf")

    def heard_from(self, peer: str, now: float) -> None:
        """Any frame from `peer` shows it, and its link, alive."""
        self._heard[peer] = now
        self._link_heard[peer] = now

    def admit(self, joiners: Iterable[str]) -> None:
        """Members new in the view just installed count as heard from now."""
        now = self._clock()
        for member in joiners:
            self._heard[member] = now

    def on_heartbeat(self, beat: Heartbeat, now: float) -> None:
        key = f"hb:{beat.origin}:{beat.seq}"
        if beat.origin == self.me or not self._seen.add(key, int(now)):
            return
        self._seen.forget_before(int(now - BEAT_MEMORY * self._timeout))
        self._heard[beat.origin] = now
        self._steps[beat.origin] = max(self._steps.get(beat.origin, -1), beat.step)
        self._membership.heard_speed(beat.origin, beat.samples_per_s)
        if beat.replicator:
            self.replicators[beat.origin] = beat.replicator
        self.job_size = max(self.job_size, beat.members)
        self.beats_heard += 1
        self._out.flood(beat)
        self.beats.notify()

    async def finished(self, members: Iterable[str], steps: int, patience: float) -> bool:
        """Wait until every one of `members` has said (in a heartbeat) that it is past the
        last step, for at most `patience` seconds; True when all did. A member that ends
        the job waits here so that it goes on forwarding until the others have the last
        total too: otherwise they would take its exit for a crash and redo the step without
        it."""
        deadline = self._clock() + patience
        others = [m for m in members if m != self.me]
        while any(self._steps.get(m, -1) < steps for m in others):
            left = deadline - self._clock()
            if left <= 0:
                return False
            await self.beats.wait(left)
        return True

    def on_ping(self, sender: str, ping: Ping, payload: bytes, now: float) -> None:
        """Answer a `Ping`; a probe's payload Ping gets the time since its empty marker
        was read here, so that traffic on the way back cannot skew the figure."""
        if not payload:
            self._ping_read[sender] = now
            pong = Pong(sender=self.me, echo=ping.sent_at)
        else:
            marker = self._ping_read.pop(sender, None)
            gap = None if marker is None else now - marker
            pong = Pong(sender=self.me, echo=ping.sent_at, gap_s=gap)
        self._out.send(sender, pong)
