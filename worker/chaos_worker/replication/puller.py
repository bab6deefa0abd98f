"""The puller (on the newcomer): fetches the snapshot of a planned join.

It takes the root's `JoinPlan`, asks the manifest of one source, asks every source for its
shards at once, checks each shard against the manifest, and re-plans what is missing with the
planner's greedy when a source closes its link, stalls, or sends a shard that fails its
checksum (that shard is fetched from another source). It also times every source's delivery
(`PullResult.transfers`): from a request sent to a source with nothing outstanding to the last
byte of the shards requested meanwhile, on the newcomer's clock, so the link table learns the
throughput each source actually gave.

With TLS (a `verifier`) the manifest must be sealed by the source that sent it, a source of
the plan (`net.signing`): its digests are then that member's word on its own snapshot. A
manifest that is not is refused as `forged` and its source dropped (its shards re-planned,
the manifest asked of another source), and a shard whose bytes do not match the sealed
digest is refused as `forged` too and fetched from another source. While two or more
sources are live, a manifest is used only once two of them sealed the same one
(`quorum`): a hostile source's manifest of a state of its own is outvoted, refused as
`forged` and its source dropped. No byte is placed before it matches.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from chaos_planner.greedy import greedy_assignment
from chaos_planner.models import Source

from chaos_worker.net.bounds import Guard, Limits, Reject, Rejections
from chaos_worker.net.shaping import TokenBucket
from chaos_worker.net.signing import Verifier
from chaos_worker.net.transport import TcpTransport, TransportFactory
from chaos_worker.net.wire import (
    JoinPlan,
    Message,
    ShardData,
    SnapshotGone,
    SnapshotManifest,
    SnapshotRequest,
)
from chaos_worker.replication.quorum import AGREEING, ManifestVotes
from chaos_worker.replication.snapshot import Layout, checked_layout, shard_bounds

log = logging.getLogger(__name__)


class JoinFailed(RuntimeError):
    """No source is left that can serve the missing shards."""


@dataclass
class _SourceState:
    id: str
    address: str
    bandwidth: float  # the plan's figure, until the source has delivered a shard
    planned: deque[int] = field(default_factory=deque)  # assigned here, not requested yet
    queued: list[int] = field(default_factory=list)  # requested, not arrived yet
    received_bytes: int = 0
    last_heard: float = 0.0
    alive: bool = True
    outstanding: int = 0  # shards requested, not yet arrived
    burst_started: float = 0.0  # when a request found nothing outstanding
    burst_bytes: int = 0
    transfers: list[tuple[int, float]] = field(default_factory=list)  # (bytes, seconds)
    busy_s: float = 0.0  # time with a request outstanding, up to `busy_mark`
    busy_mark: float | None = None
    delivered: int = 0  # bytes of every shard that arrived (checked or not)

    def requested(self, now: float) -> None:
        if self.outstanding == 0:
            self.burst_started, self.burst_bytes = now, 0
            self.busy_mark = now
        self.outstanding += 1

    def arrived(self, nbytes: int, now: float) -> None:
        """A requested shard's last byte is in; a burst ends when nothing is outstanding."""
        self.outstanding -= 1
        self.burst_bytes += nbytes
        self.delivered += nbytes
        if self.busy_mark is not None:
            self.busy_s += now - self.busy_mark
            self.busy_mark = now
        if self.outstanding == 0:
            self.busy_mark = None
            if now > self.burst_started:
                self.transfers.append((self.burst_bytes, now - self.burst_started))

    def rate(self, now: float, shard_bytes: int) -> float:
        """Bytes/s this source delivers while asked: measured once a shard has arrived (the
        time of what is in flight counts, so a stalling source's figure falls), else the
        plan's figure."""
        if self.delivered < shard_bytes:
            return self.bandwidth
        busy = self.busy_s + (now - self.busy_mark if self.busy_mark is not None else 0.0)
        return self.delivered / max(busy, 1e-6)

    def window_bytes(self, now: float, shard_bytes: int) -> float:
        """Bytes to keep requested: `WINDOW_S` of delivery, at least two shards (only two
        until the source has been measured, so a wrong planned figure commits little)."""
        if self.delivered < shard_bytes:
            return 2 * shard_bytes
        return max(2 * shard_bytes, self.rate(now, shard_bytes) * WINDOW_S)


WINDOW_S = 0.05
"""Each source keeps this much of its measured delivery requested ahead (see `Puller`)."""
REBALANCE_EVERY_S = 0.01
"""Least time between two re-plans of the unrequested shards of an adaptive pull."""


@dataclass
class PullResult:
    step: int
    layout: Layout
    data: np.ndarray
    bytes_per_source: dict[str, int]
    replans: int
    rejected: int
    transfers: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    """Per source, (bytes, seconds) of every burst of shards it delivered completely."""
    rebalances: int = 0
    """Times an adaptive pull moved unrequested shards between sources."""


class Puller:
    """Fetches the snapshot of `plan` for newcomer `me`; see the module docstring."""

    def __init__(
        self,
        me: str,
        plan: JoinPlan,
        *,
        host: str = "127.0.0.1",
        downlink: TokenBucket | None = None,
        stall_timeout_s: float = 5.0,
        on_progress: Callable[[dict[str, int], int, int], None] | None = None,
        on_result: Callable[[PullResult], None] | None = None,
        transport_factory: TransportFactory = TcpTransport,
        verifier: Verifier | None = None,
        reject: Reject | None = None,
        quorum: int = 1,
    ) -> None:
        """`verifier` (with TLS) checks the manifest's seal; `reject` counts what is
        refused as forged; `quorum`: sources that must seal the same manifest even when
        fewer are live (`WorkerConfig.state_quorum`)."""
        self.me = me
        self._verifier = verifier
        self._quorum = quorum
        self._reject = reject if reject is not None else Rejections()
        self.on_result = on_result
        self.plan = plan
        self.host = host
        self.stall_timeout_s = stall_timeout_s
        self.on_progress = on_progress
        self.adaptive = plan.strategy == "greedy"
        # nothing a source sends is larger than the state (a shard of it)
        self.transport = transport_factory(
            me,
            self._on_message,
            self._on_disconnect,
            max_payload=plan.state_bytes,
            downlink=downlink,
        )
        self.transport.guard = Guard(Limits(state_bytes=plan.state_bytes))
        self.sources = {
            sid: _SourceState(sid, plan.replicators[sid], plan.bandwidths.get(sid, 1e8))
            for sid in plan.replicators
        }
        self.address = ""
        self.manifest: SnapshotManifest | None = None
        self._votes = ManifestVotes()
        self._asked: set[str] = set()  # sources asked for the manifest
        self.data: np.ndarray | None = None
        self.done: set[int] = set()
        self.replans = 0
        self.rebalances = 0
        self.rejected = 0
        self._bad: dict[int, set[str]] = {}
        self._failure: JoinFailed | None = None
        self._early: list[tuple[_SourceState, ShardData, bytes]] = []
        self._wake = asyncio.Event()
        self._rebalanced_at = 0.0
        self._checking = 0  # shards arrived and waiting for (or in) their checksum test

    async def run(self) -> PullResult:
        """Pull every shard; raises JoinFailed when no source can serve what is missing.

        Shards are requested together with the manifest; those that arrive before it wait
        for it to be checked.
        """
        port = await self.transport.listen(self.host, 0)
        self.address = f"{self.host}:{port}"
        try:
            now = time.monotonic()
            for source in self.sources.values():
                source.last_heard = now
            self._settle_manifest()
            for sid, indices in self.plan.assignment.items():
                self.sources[sid].planned.extend(indices)
            self._fill_all()
            while len(self.done) < self.plan.shards:
                await self._nap()
                if self.manifest is None:
                    self._settle_manifest()
                self._check_stalls(time.monotonic())
                if self._failure is not None:
                    raise self._failure
            layout = Layout.model_validate(self.manifest.layout)
            result = PullResult(
                step=self.plan.step,
                layout=layout,
                data=self.data,
                bytes_per_source={s.id: s.received_bytes for s in self.sources.values()},
                replans=self.replans,
                rejected=self.rejected,
                transfers={s.id: s.transfers for s in self.sources.values() if s.transfers},
                rebalances=self.rebalances,
            )
            if self.on_result is not None:  # before the connections are closed
                self.on_result(result)
            return result
        finally:
            await self.transport.close()

    def remaining_s(self, now: float) -> float:
        """Predicted seconds until every shard is in: the latest of the live sources to
        deliver what they still have to send, each at its own rate (a shard in flight
        cannot move to a faster source)."""
        shard = self._shard_bytes()
        busy = [s for s in self.sources.values() if s.alive and (s.planned or s.outstanding)]
        if not busy:  # all arrived: checking the last ones is quick, unless a refetch is due
            return 0.0 if len(self.done) + self._checking >= self.plan.shards else float("inf")
        return max(
            (len(s.planned) + s.outstanding) * shard / max(s.rate(now, shard), 1.0) for s in busy
        )

    def _needed(self) -> int:
        """Sources that must seal the same manifest (with TLS): two while two can, and
        never fewer than the quorum (with fewer able, the pull fails)."""
        if self._verifier is None:
            return 1
        able = {s.id for s in self.sources.values() if s.alive} | set(self._votes.by_sender)
        return max(self._quorum, min(AGREEING, len(able)))

    def _settle_manifest(self) -> None:
        """Use the manifest enough sources agree on, or ask more sources for theirs (the
        plan's manifest source first, then those with the largest shares)."""
        needed = self._needed()
        agreed = self._votes.agreed(needed)
        if agreed is not None:
            self._adopt(agreed)
            return
        pending = [
            sid
            for sid in self._asked
            if self.sources[sid].alive and sid not in self._votes.by_sender
        ]
        for _ in range(self._votes.missing(needed) - len(pending)):
            unasked = [s for s in self.sources.values() if s.alive and s.id not in self._asked]
            if not unasked:
                break
            first = self.plan.manifest_from
            pick = max(
                unasked,
                key=lambda s: (s.id == first, len(self.plan.assignment.get(s.id, [])), s.id),
            )
            self._ask_manifest(pick.id)
            pending.append(pick.id)
        if not pending:
            seen = ", ".join(sorted(self._votes.by_sender)) or "none"
            self._failure = JoinFailed(
                f"no {needed} sources sealed the same manifest (manifests from: {seen})"
            )

    def _ask_manifest(self, sid: str) -> None:
        self._asked.add(sid)
        source = self.sources[sid]
        source.last_heard = time.monotonic()
        self.transport.connect(sid, source.address)
        request = SnapshotRequest(
            sender=self.me, reply_to=self.address, step=self.plan.step, shards=self.plan.shards
        )
        self.transport.send(sid, request)

    def _adopt(self, manifest: SnapshotManifest) -> None:
        """Use `manifest`: place the shards that came early, drop those who sealed another."""
        self.manifest = manifest
        layout = Layout.model_validate(manifest.layout)
        # pages are touched as shards land, not all at once on this loop
        self.data = np.empty(layout.total_bytes, np.uint8)
        early, self._early = self._early, []
        self._checking -= len(early)
        for sid in self._votes.dissenters(manifest):
            self._outvoted(sid)
        for source_state, shard, data in early:
            if source_state.alive:
                self._on_shard(source_state, shard, data)

    def _outvoted(self, sid: str) -> None:
        """Refuse `sid`, whose sealed manifest differs from the one its peers agree on."""
        detail = f"its manifest of snapshot {self.plan.step} differs from the one others sealed"
        self._reject(sid, "forged", detail)
        log.warning("source %s: %s; dropping it", sid, detail)
        if self.sources[sid].alive:
            self._drop(self.sources[sid])

    async def _nap(self) -> None:
        """Wait for a message or a tenth of a second."""
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), 0.1)

    def _fill_all(self) -> None:
        for source in self.sources.values():
            self._fill(source)

    def _fill(self, source: _SourceState) -> None:
        """Request planned shards from `source` until its window is full."""
        if not source.alive:
            return
        now = time.monotonic()
        shard = self._shard_bytes()
        while source.planned and source.outstanding * shard < source.window_bytes(now, shard):
            self._request(source.id, source.planned.popleft())

    def _request(self, sid: str, index: int) -> None:
        source = self.sources[sid]
        source.queued.append(index)
        source.requested(time.monotonic())
        self.transport.connect(sid, source.address)
        self.transport.send(
            sid,
            SnapshotRequest(
                sender=self.me,
                reply_to=self.address,
                step=self.plan.step,
                shards=self.plan.shards,
                index=index,
            ),
        )

    def _on_message(self, sender: str, message: Message, payload: bytes) -> None:
        source = self.sources.get(sender)
        if source is None:
            return
        source.last_heard = time.monotonic()
        if isinstance(message, SnapshotManifest):
            if self.manifest is None and self._unsealed(sender, message):
                self._drop(source)
                self._wake.set()
                return
            layout = _layout(message.layout)
            valid = (
                message.step == self.plan.step
                and message.shards == self.plan.shards
                and len(message.sha256) == self.plan.shards
                and layout is not None
                and layout.total_bytes <= self.plan.state_bytes  # no more than the root planned
            )
            if valid and sender not in self._votes.by_sender:
                self._votes.add(sender, message)
                if self.manifest is None:
                    self._settle_manifest()
                elif sender in self._votes.dissenters(self.manifest):
                    self._outvoted(sender)
        elif isinstance(message, ShardData):
            current = message.step == self.plan.step and message.index in source.queued
            if current and source.outstanding > 0:
                source.arrived(len(payload), source.last_heard)
            self._on_shard(source, message, payload)
            self._rebalance(source.last_heard)
            self._fill_all()
        elif isinstance(message, SnapshotGone):
            log.warning(
                "source %s cannot serve snapshot %d: %s", sender, message.step, message.reason
            )
            self._drop(source)
        self._wake.set()

    def _on_shard(self, source: _SourceState, message: ShardData, payload: bytes) -> None:
        index = message.index
        if (
            message.step != self.plan.step
            or message.shards != self.plan.shards
            or index not in source.queued
        ):
            return
        if self.manifest is None:
            self._early.append((source, message, payload))
            self._checking += 1
            return
        source.queued.remove(index)
        if index in self.done:
            return
        self._checking += 1
        asyncio.get_running_loop().create_task(self._check(source, index, payload))

    async def _check(self, source: _SourceState, index: int, payload: bytes) -> None:
        """Verify a shard against the manifest (hashing in a thread), then keep or refetch."""
        start, end = shard_bounds(len(self.data), self.plan.shards, index)
        expected = self.manifest.sha256[index]

        def verify_and_place() -> bool:  # in a thread: hashing and copying free the loop
            if len(payload) != end - start or hashlib.sha256(payload).hexdigest() != expected:
                return False
            self.data[start:end] = np.frombuffer(payload, np.uint8)
            return True

        good = await asyncio.to_thread(verify_and_place)
        self._checking -= 1
        self._wake.set()
        if index in self.done:
            return
        if not good:
            self.rejected += 1
            self._bad.setdefault(index, set()).add(source.id)
            if self._verifier is not None:
                detail = f"shard {index} does not match the digest {self.manifest.sender} sealed"
                self._reject(source.id, "forged", detail)
            log.warning("shard %d from %s failed its checksum; fetching it again", index, source.id)
            self._replan([index])
            return
        self.done.add(index)
        source.received_bytes += len(payload)
        if self.on_progress is not None:
            received = {s.id: s.received_bytes for s in self.sources.values()}
            self.on_progress(received, len(self.done), self.plan.shards)

    def _unsealed(self, sender: str, manifest: SnapshotManifest) -> bool:
        """With TLS: whether `manifest` is not sealed by `sender`, the source that sent it
        (then refused as forged)."""
        if self._verifier is None:
            return False
        why = self._verifier.check(manifest)
        if why is None and manifest.sender != sender:
            why = f"it names {manifest.sender} as its sender"
        if why is not None:
            self._reject(sender, "forged", f"manifest of snapshot {manifest.step}: {why}")
        return why is not None

    def _on_disconnect(self, peer: str, graceful: bool) -> None:
        source = self.sources.get(peer)
        if source is None or not source.alive:
            return
        if source.queued or source.planned:
            log.warning("source %s closed its link mid-transfer; re-planning", peer)
            self._drop(source)
        elif self.manifest is None:
            source.alive = False
        self._wake.set()

    def _check_stalls(self, now: float) -> None:
        for source in self.sources.values():
            # a shard arrives whole: allow three times its planned transfer time
            patience = max(self.stall_timeout_s, 3 * self._shard_bytes() / source.bandwidth)
            if source.alive and source.queued and now - source.last_heard > patience:
                log.warning("source %s stalled; re-planning its shards", source.id)
                self._drop(source)

    def _drop(self, source: _SourceState) -> None:
        source.alive = False
        source.outstanding = 0  # an unfinished burst says nothing reliable
        source.busy_mark = None
        missing = [*source.queued, *source.planned]
        source.queued.clear()
        source.planned.clear()
        self.transport.disconnect(source.id)
        self._replan(missing)

    def _shard_bytes(self) -> int:
        """Bytes per shard (a guess from the plan until the manifest says)."""
        total = len(self.data) if self.data is not None else self.plan.state_bytes
        return max(1, total // self.plan.shards)

    def _candidates(self, allowed: list[_SourceState], now: float) -> list[Source]:
        """The planner's view of `allowed`: measured rates, busy until their queue is in."""
        shard = self._shard_bytes()
        out = []
        for s in allowed:
            rate = s.rate(now, shard)
            ready = (len(s.queued) + len(s.planned)) * shard / rate
            out.append(Source(id=s.id, bandwidth_bytes_per_s=float(rate), ready_s=ready))
        return out

    def _rebalance(self, now: float) -> None:
        """Adaptive pull: re-plan the shards not requested yet with the greedy over the
        sources' measured rates, so a source slower than planned hands its later shards to
        faster ones and the sources still finish together."""
        if not self.adaptive or now - self._rebalanced_at < REBALANCE_EVERY_S:
            return
        self._rebalanced_at = now
        alive = [s for s in self.sources.values() if s.alive]
        # a shard that failed its checksum somewhere stays where `_replan` put it
        pool = sorted(i for s in alive for i in s.planned if i not in self._bad)
        if not pool or len(alive) < 2:
            return
        kept = {s.id: [i for i in s.planned if i not in self._bad] for s in alive}
        for s in alive:
            pinned = [i for i in s.planned if i in self._bad]
            s.planned.clear()
            s.planned.extend(pinned)
        counts = greedy_assignment(
            self._candidates(alive, now), self._shard_bytes() * len(pool), len(pool)
        )
        if counts is None:  # cannot happen without shard caps; keep the plan as it was
            for s in alive:
                s.planned.extend(kept[s.id])
            return
        spare: list[int] = []
        for s in alive:  # each source keeps what it had, up to its new count
            mine = kept[s.id]
            s.planned.extend(mine[: counts.get(s.id, 0)])
            spare.extend(mine[counts.get(s.id, 0) :])
        if spare:
            self.rebalances += 1
        spare.sort()
        for s in alive:
            take = counts.get(s.id, 0) - len(kept[s.id][: counts.get(s.id, 0)])
            s.planned.extend(spare[:take])
            del spare[:take]

    def _replan(self, missing: list[int]) -> None:
        """Give `missing` shards to the live sources the greedy says finish them first."""
        missing = [i for i in missing if i not in self.done]
        if not missing:
            return
        self.replans += 1
        now = time.monotonic()
        shard_bytes = self._shard_bytes()
        for index in sorted(missing):
            allowed = [
                s
                for s in self.sources.values()
                if s.alive and s.id not in self._bad.get(index, set())
            ]
            if not allowed:
                self._failure = JoinFailed(f"no source left for shard {index}")
                return
            counts = greedy_assignment(self._candidates(allowed, now), shard_bytes, 1)
            self.sources[next(iter(counts))].planned.appendleft(index)
        self._fill_all()


def _layout(raw: dict) -> Layout | None:
    """A manifest's layout, or None when it is not one a load can read."""
    try:
        return checked_layout(raw)
    except ValueError:
        return None
