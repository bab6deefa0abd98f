"""Replication: the replicator serves snapshot shards; the puller fetches a planned join.

The replicator (the pod's sidecar role; `chaos replicator` runs it as its own process over a
snapshot directory) answers `SnapshotRequest`s from newcomers with a manifest (layout and
per-shard SHA-256) or one shard, over its own shaped links. Requests of one newcomer are
served in order, so a source streams its shards back to back. It also answers a newcomer's
downlink probe (`ProbeRequest`, see `joinprobe.py`) with a train of zero-filled frames.

The puller (on the newcomer) takes the root's `JoinPlan`, asks the manifest of one source,
asks every source for its shards at once, checks each shard against the manifest, and
re-plans what is missing with the planner's greedy when a source closes its link, stalls,
or sends a shard that fails its checksum (that shard is fetched from another source). It
also times every source's delivery (`PullResult.transfers`): from a request sent to a source
with nothing outstanding to the last byte of the shards requested meanwhile, on the
newcomer's clock, so the link table learns the throughput each source actually gave.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from chaos_planner.greedy import greedy_assignment
from chaos_planner.models import Source

from chaos_worker.shaping import LinkShape, TokenBucket
from chaos_worker.snapshot import Layout, Snapshot, SnapshotStore, shard_bounds
from chaos_worker.transport import Transport
from chaos_worker.wire import (
    JoinPlan,
    Message,
    ProbeData,
    ProbeRequest,
    ShardData,
    SnapshotGone,
    SnapshotManifest,
    SnapshotRequest,
)

log = logging.getLogger(__name__)

WAIT_FOR_SNAPSHOT_S = 30.0
"""How long a replicator waits for a requested snapshot that has not been published yet."""


class JoinFailed(RuntimeError):
    """No source is left that can serve the missing shards."""


class Replicator:
    """Serves the snapshots of `store`; see the module docstring."""

    def __init__(
        self,
        me: str,
        store: SnapshotStore,
        *,
        shape: Callable[[str], LinkShape] | None = None,
        corrupt_once: bool = False,
        on_sent: Callable[[str, int], None] | None = None,
    ) -> None:
        self.me = me
        self.on_sent = on_sent  # (peer, shard bytes) after each shard sent
        self.store = store
        self.transport = Transport(
            me, self._on_message, self._on_disconnect, max_payload=1 << 16, shape=shape
        )
        self.address = ""
        self.sent_bytes: dict[str, int] = {}
        self._corrupt = corrupt_once  # test-only fault injection: flip one byte, once
        self._queues: dict[str, asyncio.Queue[SnapshotRequest]] = {}
        self._workers: dict[str, asyncio.Task] = {}
        self._cache: dict[int, Snapshot] = {}

    async def start(self, host: str, port: int = 0) -> str:
        """Listen; returns `host:port`."""
        bound = await self.transport.listen(host, port)
        self.address = f"{host}:{bound}"
        return self.address

    async def close(self) -> None:
        for task in self._workers.values():
            task.cancel()
        await self.transport.close()

    def _on_message(self, sender: str, message: Message, _payload: bytes) -> None:
        if isinstance(message, ProbeRequest):
            self._answer_probe(sender, message)
            return
        if not isinstance(message, SnapshotRequest):
            return
        if message.index is None:  # a manifest is small but needs hashing: do not queue it
            asyncio.get_running_loop().create_task(self._answer(sender, message))
            return
        queue = self._queues.setdefault(sender, asyncio.Queue())
        queue.put_nowait(message)
        task = self._workers.get(sender)
        if task is None or task.done():
            self._workers[sender] = asyncio.get_running_loop().create_task(self._serve(sender))

    def _on_disconnect(self, peer: str, _graceful: bool) -> None:
        task = self._workers.pop(peer, None)
        if task is not None:
            task.cancel()
        self._queues.pop(peer, None)
        self.transport.disconnect(peer)

    async def _serve(self, peer: str) -> None:
        queue = self._queues[peer]
        while True:
            await self._answer(peer, await queue.get())

    async def _answer(self, peer: str, request: SnapshotRequest) -> None:
        """Send the manifest or the shard that `request` asks for."""
        self.transport.connect(peer, request.reply_to)
        snap = await self._snapshot(request.step)
        if snap is None:
            gone = SnapshotGone(sender=self.me, step=request.step, reason="not held here")
            self.transport.send(peer, gone)
        elif request.index is None:
            hashes = await asyncio.to_thread(snap.shard_hashes, request.shards)
            manifest = SnapshotManifest(
                sender=self.me,
                step=snap.step,
                shards=request.shards,
                layout=snap.layout.model_dump(),
                sha256=hashes,
            )
            self.transport.send(peer, manifest)
        elif 0 <= request.index < request.shards:
            data: memoryview | bytes = snap.shard(request.shards, request.index)
            if self._corrupt and len(data):
                self._corrupt = False
                flipped = bytearray(data)
                flipped[len(flipped) // 2] ^= 0xFF
                data = bytes(flipped)
                log.warning("fault injection: flipped one byte of shard %d", request.index)
            header = ShardData(
                sender=self.me, step=snap.step, shards=request.shards, index=request.index
            )
            self.transport.send(peer, header, data)
            self.sent_bytes[peer] = self.sent_bytes.get(peer, 0) + len(data)
            if self.on_sent is not None:
                self.on_sent(peer, len(data))

    def _answer_probe(self, peer: str, request: ProbeRequest) -> None:
        """A newcomer times its downlink from here: a train of zero-filled frames."""
        self.transport.connect(peer, request.reply_to)
        zeros = bytes(request.frame_bytes)
        for index in range(request.frames):
            frame = ProbeData(sender=self.me, index=index, frames=request.frames)
            self.transport.send(peer, frame, zeros)

    async def _snapshot(self, step: int) -> Snapshot | None:
        """Snapshot `step`, waiting a while for it to be published."""
        deadline = time.monotonic() + WAIT_FOR_SNAPSHOT_S
        while True:
            snap = self._cache.get(step) or self.store.get(step)
            if snap is not None:
                self._cache = {step: snap}
                return snap
            latest = self.store.latest_step()
            if (latest is not None and latest > step + 1) or time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.005)


@dataclass
class _SourceState:
    id: str
    address: str
    bandwidth: float
    queued: list[int] = field(default_factory=list)
    received_bytes: int = 0
    started: float = 0.0
    last_heard: float = 0.0
    alive: bool = True
    outstanding: int = 0  # shards requested, not yet arrived
    burst_started: float = 0.0  # when a request found nothing outstanding
    burst_bytes: int = 0
    transfers: list[tuple[int, float]] = field(default_factory=list)  # (bytes, seconds)

    def requested(self, now: float) -> None:
        if self.outstanding == 0:
            self.burst_started, self.burst_bytes = now, 0
        self.outstanding += 1

    def arrived(self, nbytes: int, now: float) -> None:
        """A requested shard's last byte is in; a burst ends when nothing is outstanding."""
        self.outstanding -= 1
        self.burst_bytes += nbytes
        if self.outstanding == 0 and now > self.burst_started:
            self.transfers.append((self.burst_bytes, now - self.burst_started))

    def measured_bandwidth(self, now: float) -> float:
        """Bytes/s actually delivered so far; the planned figure until there is data."""
        elapsed = now - self.started
        if self.received_bytes < (256 << 10) or elapsed <= 0:
            return self.bandwidth
        return self.received_bytes / elapsed


@dataclass
class PullResult:
    step: int
    layout: Layout
    data: bytearray
    bytes_per_source: dict[str, int]
    replans: int
    rejected: int
    transfers: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    """Per source, (bytes, seconds) of every burst of shards it delivered completely."""


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
    ) -> None:
        self.me = me
        self.plan = plan
        self.host = host
        self.stall_timeout_s = stall_timeout_s
        self.on_progress = on_progress
        self.transport = Transport(
            me, self._on_message, self._on_disconnect, max_payload=1 << 34, downlink=downlink
        )
        self.sources = {
            sid: _SourceState(sid, plan.replicators[sid], plan.bandwidths.get(sid, 1e8))
            for sid in plan.replicators
        }
        self.address = ""
        self.manifest: SnapshotManifest | None = None
        self.data: bytearray | None = None
        self.done: set[int] = set()
        self.replans = 0
        self.rejected = 0
        self._bad: dict[int, set[str]] = {}
        self._failure: JoinFailed | None = None
        self._early: list[tuple[_SourceState, ShardData, bytes]] = []
        self._wake = asyncio.Event()

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
                source.started = source.last_heard = now
            asked = self._ask_manifest(self.plan.manifest_from)
            for sid, indices in self.plan.assignment.items():
                for index in indices:
                    self._request(sid, index)
            while len(self.done) < self.plan.shards:
                await self._nap()
                if self.manifest is None and not self.sources[asked].alive:
                    asked = self._ask_manifest(self._next_manifest_source())
                self._check_stalls(time.monotonic())
                if self._failure is not None:
                    raise self._failure
            layout = Layout.model_validate(self.manifest.layout)
            return PullResult(
                step=self.plan.step,
                layout=layout,
                data=self.data,
                bytes_per_source={s.id: s.received_bytes for s in self.sources.values()},
                replans=self.replans,
                rejected=self.rejected,
                transfers={s.id: s.transfers for s in self.sources.values() if s.transfers},
            )
        finally:
            await self.transport.close()

    def _ask_manifest(self, sid: str) -> str:
        source = self.sources[sid]
        source.last_heard = time.monotonic()
        self.transport.connect(sid, source.address)
        request = SnapshotRequest(
            sender=self.me, reply_to=self.address, step=self.plan.step, shards=self.plan.shards
        )
        self.transport.send(sid, request)
        return sid

    def _next_manifest_source(self) -> str:
        """The live source with the largest share, to ask for the manifest instead."""
        alive = [s for s in self.sources.values() if s.alive]
        if not alive:
            raise JoinFailed("no source could send the snapshot's manifest")
        return max(alive, key=lambda s: (len(self.plan.assignment.get(s.id, [])), s.id)).id

    async def _nap(self) -> None:
        """Wait for a message or a tenth of a second."""
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), 0.1)

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
            valid = (
                message.step == self.plan.step
                and message.shards == self.plan.shards
                and len(message.sha256) == self.plan.shards
            )
            if self.manifest is None and valid:
                self.manifest = message
                self.data = bytearray(Layout.model_validate(message.layout).total_bytes)
                early, self._early = self._early, []
                for source_state, shard, data in early:
                    self._on_shard(source_state, shard, data)
        elif isinstance(message, ShardData):
            current = message.step == self.plan.step and message.index in source.queued
            if current and source.outstanding > 0:
                source.arrived(len(payload), source.last_heard)
            self._on_shard(source, message, payload)
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
            return
        source.queued.remove(index)
        if index in self.done:
            return
        asyncio.get_running_loop().create_task(self._check(source, index, payload))

    async def _check(self, source: _SourceState, index: int, payload: bytes) -> None:
        """Verify a shard against the manifest (hashing in a thread), then keep or refetch."""
        start, end = shard_bounds(len(self.data), self.plan.shards, index)
        digest = await asyncio.to_thread(lambda: hashlib.sha256(payload).hexdigest())
        self._wake.set()
        if index in self.done:
            return
        if len(payload) != end - start or digest != self.manifest.sha256[index]:
            self.rejected += 1
            self._bad.setdefault(index, set()).add(source.id)
            log.warning("shard %d from %s failed its checksum; fetching it again", index, source.id)
            self._replan([index])
            return
        self.data[start:end] = payload
        self.done.add(index)
        source.received_bytes += len(payload)
        if self.on_progress is not None:
            received = {s.id: s.received_bytes for s in self.sources.values()}
            self.on_progress(received, len(self.done), self.plan.shards)

    def _on_disconnect(self, peer: str, graceful: bool) -> None:
        source = self.sources.get(peer)
        if source is None or not source.alive:
            return
        if source.queued:
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
        missing = list(source.queued)
        source.queued.clear()
        self.transport.disconnect(source.id)
        self._replan(missing)

    def _shard_bytes(self) -> int:
        """Bytes per shard (a guess from the plan until the manifest says)."""
        total = len(self.data) if self.data is not None else self.plan.state_bytes
        return max(1, total // self.plan.shards)

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
            candidates = [
                Source(
                    id=s.id,
                    bandwidth_bytes_per_s=float(s.measured_bandwidth(now)),
                    ready_s=len(s.queued) * shard_bytes / s.measured_bandwidth(now),
                )
                for s in allowed
            ]
            counts = greedy_assignment(candidates, shard_bytes, 1)
            self._request(next(iter(counts)), index)
