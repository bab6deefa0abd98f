"""The replicator: serves snapshot shards to newcomers (the pod's sidecar role).

`chaos replicator` runs it as its own process over a snapshot directory. It answers
`SnapshotRequest`s from newcomers with a manifest (layout and per-shard SHA-256) or one shard,
over its own shaped links. Requests of one newcomer are served in order, so a source streams
its shards back to back. It also answers a newcomer's downlink probe (`ProbeRequest`, see
`join/probe.py`) with a train of zero-filled frames.

With TLS (a `signer`: the member's own key) it seals each manifest as its member's word,
and serves a snapshot only to a newcomer its member admitted to pull it
(`replication.admission`): the newcomer is the member the requesting connection's
certificate names, and the answer goes back under that name, so only to a server holding
that certificate. A request of anyone else waits a little for the member to record the
plan (the newcomer may hear of it first), then is refused (`forged`) and answered nothing.
A probe is answered, with TLS, only to a newcomer that announced it (a peer no member
that its member recorded), with at most `PROBE_BUDGET_FRAMES` frames per join attempt
(over it: `unexpected`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Hashable

from chaos_worker.net.bounds import Reject, Rejections
from chaos_worker.net.shaping import LinkShape
from chaos_worker.net.signing import Signer
from chaos_worker.net.transport import TcpTransport, TransportFactory
from chaos_worker.net.wire import (
    Message,
    ProbeData,
    ProbeRequest,
    ShardData,
    SnapshotGone,
    SnapshotManifest,
    SnapshotRequest,
)
from chaos_worker.replication.admission import PROBE_BUDGET_FRAMES, keep_newest
from chaos_worker.replication.snapshot import Snapshot, SnapshotStore

log = logging.getLogger(__name__)

WAIT_FOR_SNAPSHOT_S = 30.0
"""How long a replicator waits for a requested snapshot that has not been published yet."""
WAIT_FOR_ADMISSION_S = 10.0
"""How long a request waits for its newcomer's admission to be recorded (with TLS)."""
MAX_QUEUED = 4096
"""Shard requests of one peer queued at once (a puller keeps a few in flight)."""
MAX_MANIFESTS = 4
"""Manifest requests of one peer answered at once (a puller asks one per source)."""
MAX_PROBES = 2
"""Probe requests of one peer answered at once (a newcomer sends one at a time)."""


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
        transport_factory: TransportFactory = TcpTransport,
        signer: Signer | None = None,
        reject: Reject | None = None,
        admission_wait_s: float = WAIT_FOR_ADMISSION_S,
    ) -> None:
        """`signer`: seal manifests and serve admitted newcomers only (with TLS);
        `reject` counts the requests refused."""
        self.me = me
        self._signer = signer
        self._reject = reject if reject is not None else Rejections()
        self._admission_wait_s = admission_wait_s
        self.on_sent = on_sent  # (peer, shard bytes) after each shard sent
        self.store = store
        self.transport = transport_factory(
            me, self._on_message, self._on_disconnect, max_payload=1 << 16, shape=shape
        )
        self.address = ""
        self.sent_bytes: dict[str, int] = {}
        self._corrupt = corrupt_once  # test-only fault injection: flip one byte, once
        self._queues: dict[str, asyncio.Queue[SnapshotRequest]] = {}
        self._workers: dict[str, asyncio.Task] = {}
        self._cache: dict[int, Snapshot] = {}
        self._in_flight: Counter[tuple[str, str]] = Counter()  # (peer, kind) answered now
        self._refused: set[Hashable] = set()  # (peer, step) or peer found not admitted
        self._probed: dict[str, tuple[str, int]] = {}  # peer -> (attempt, frames sent)

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
        if isinstance(message, ProbeRequest):  # may wait for its record: not queued
            self._start(sender, "probe", MAX_PROBES, lambda: self._answer_probe(sender, message))
            return
        if not isinstance(message, SnapshotRequest):
            return
        if message.index is None:  # a manifest is small but needs hashing: do not queue it
            self._start(sender, "manifest", MAX_MANIFESTS, lambda: self._answer(sender, message))
            return
        queue = self._queues.setdefault(sender, asyncio.Queue(MAX_QUEUED))
        try:
            queue.put_nowait(message)
        except asyncio.QueueFull:
            self._reject(sender, "unexpected", f"over {MAX_QUEUED} shard requests queued")
            return
        task = self._workers.get(sender)
        if task is None or task.done():
            self._workers[sender] = asyncio.get_running_loop().create_task(self._serve(sender))

    def _start(
        self, peer: str, kind: str, limit: int, answer: Callable[[], Coroutine[None, None, None]]
    ) -> None:
        """Answer in a task of its own, at most `limit` requests of `kind` per peer at once
        (over it: refused as `unexpected`)."""
        key = (peer, kind)
        if self._in_flight[key] >= limit:
            self._reject(peer, "unexpected", f"over {limit} {kind} requests at once")
            return
        self._in_flight[key] += 1
        task = asyncio.get_running_loop().create_task(answer())
        task.add_done_callback(lambda _: self._done(key))

    def _done(self, key: tuple[str, str]) -> None:
        self._in_flight[key] -= 1
        if self._in_flight[key] <= 0:
            del self._in_flight[key]

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
        """Send the manifest or the shard that `request` asks for (to `peer` only)."""
        if not await self._admitted(peer, request.step):
            what = "a manifest" if request.index is None else f"shard {request.index}"
            detail = f"{what} of snapshot {request.step} for a newcomer not admitted to it"
            self._reject(peer, "forged", detail)
            return
        self.transport.connect(peer, request.reply_to)
        snap = await self._snapshot(request.step)
        if snap is None:
            gone = SnapshotGone(sender=self.me, step=request.step, reason="not held here")
            self.transport.send(peer, gone)
        elif request.index is None:
            hashes = await self._hashes(snap, request.shards)
            manifest = SnapshotManifest(
                sender=self.me,
                step=snap.step,
                shards=request.shards,
                layout=snap.layout.model_dump(),
                sha256=hashes,
            )
            if self._signer is not None:
                manifest = self._signer.seal(manifest)
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

    async def _answer_probe(self, peer: str, request: ProbeRequest) -> None:
        """A newcomer times its downlink from here: a train of zero-filled frames."""
        if not await self._may_probe(peer, request.frames):
            return
        self.transport.connect(peer, request.reply_to)
        zeros = bytes(request.frame_bytes)
        for index in range(request.frames):
            frame = ProbeData(sender=self.me, index=index, frames=request.frames)
            self.transport.send(peer, frame, zeros)

    async def _hashes(self, snap: Snapshot, shards: int) -> list[str]:
        """The manifest's shard hashes: this replicator's own (in a thread), or the
        trainer's if they come first. Its trainer hashes a pinned snapshot as soon as the
        join plan arrives, at normal priority; a replicator process runs at a lower one."""
        own = asyncio.ensure_future(asyncio.to_thread(snap.shard_hashes, shards))
        while not own.done():
            theirs = self.store.prehashed(snap.step, shards)
            if theirs is not None:
                return theirs
            await asyncio.wait({own}, timeout=0.005)
        return own.result()

    async def _admitted(self, peer: str, step: int) -> bool:
        """Whether `peer` may pull snapshot `step` (always without TLS), waiting a while
        for this member to record its plan."""
        admissions = self.store.admissions
        return await self._recorded((peer, step), lambda: admissions.admits(peer, step))

    async def _may_probe(self, peer: str, frames: int) -> bool:
        """Whether `peer` may pull `frames` probe frames more (always without TLS): it
        announced a probe attempt (waiting a while for this member to record it), and its
        frames of that attempt stay within `PROBE_BUDGET_FRAMES`. Refusals are counted."""
        if self._signer is None:
            return True
        admissions = self.store.admissions
        await self._recorded(peer, lambda: admissions.probing(peer) is not None)
        attempt = admissions.probing(peer)
        if attempt is None:
            self._reject(peer, "forged", "a downlink probe of a peer that announced none")
            return False
        last, sent = self._probed.pop(peer, (attempt, 0))
        sent = sent if last == attempt else 0
        allowed = sent + frames <= PROBE_BUDGET_FRAMES
        self._probed[peer] = (attempt, sent + frames if allowed else sent)
        keep_newest(self._probed)
        if not allowed:
            detail = f"{sent + frames} probe frames in one join attempt, over {PROBE_BUDGET_FRAMES}"
            self._reject(peer, "unexpected", detail)
        return allowed

    async def _recorded(self, key: Hashable, recorded: Callable[[], bool]) -> bool:
        """Whether this member recorded `key` (always without TLS), waiting a while for it
        once per key."""
        if self._signer is None:
            return True
        waited = key in self._refused  # waited once already: not again
        deadline = time.monotonic() + (0.0 if waited else self._admission_wait_s)
        while not recorded():
            if time.monotonic() >= deadline:
                if len(self._refused) >= MAX_QUEUED:
                    self._refused.clear()
                self._refused.add(key)
                return False
            await asyncio.sleep(0.005)
        return True

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
