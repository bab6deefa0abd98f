"""The federation service inside `chaos operator`: an HTTPS server and a sync loop.

* The server (`--federation-listen HOST:PORT`) answers `POST /v1/sync` only to clients whose
  certificate matches one of this party's ChaosPeer objects (`tls.match_client`: pin, dates
  and the party the ChaosPeer names); it stores the client's message as that party's and
  answers with ours for that peer. A refused client is logged once per reason.
* The sync loop, every `interval_s`, lists the ChaosPeers, exchanges messages with each peer
  (`tls.exchange`), writes each ChaosPeer's status (and an Event when its `Federated`
  condition changes), and asks for a reconcile of every local job whose view changed.
* `publish`/`forget` are called by the reconcile of each ChaosJob with what the job runs;
  `view` gives the reconcile what the job knows of the other parties.

* Worker CAs: each message carries the sender's worker CA of the namespace of the ChaosPeer
  (`worker_ca`, set by `run_operator`: our own). A received one is checked
  (`workerca.peer_ca`: one certificate, a CA, within its dates); a bad one is refused with a
  warning (once per peer and reason), counted in `refused_cas` and ignored, the sync goes on.
  The last good one of each ChaosPeer is kept (while that peer is trusted; not expired with
  its record: the party's workers keep running when its operator is away) and `worker_trust`
  hands them, by party, to the pods' trust bundles (`chaos_operator.identities`).

Either side's request refreshes what we know of a peer, so one working direction is enough;
what we heard expires after `ttl_s`, so a party that goes away stops counting, and nothing here
waits for any other party.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from cryptography import x509
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from chaos_operator.api import GROUP, VERSION, ChaosPeer
from chaos_operator.federation import tls
from chaos_operator.federation.identity import Identity, IdentityError, spki_fingerprint
from chaos_operator.federation.protocol import MAX_BODY_BYTES, SYNC_PATH, SyncMessage
from chaos_operator.federation.rules import (
    TRUST_FAILURES,
    ExchangeOutcome,
    FederationView,
    PeerRecord,
    PublishedJob,
    job_view,
    outgoing,
    peer_key,
    peer_status,
    remote_members_here,
    status_unchanged,
)
from chaos_operator.federation.workerca import peer_ca
from chaos_operator.kube import list_objects, post_event

PEERS = "chaospeers"
log = logging.getLogger("chaos_operator.federation")

Key = tuple[str, str]
OnChange = Callable[[str, str], Awaitable[None]]
"""Called with (namespace, job name) when what a job sees of the federation changed."""


class FederationService:
    """Server, sync loop and the shared state between them and the reconciles."""

    def __init__(
        self,
        identity: Identity,
        api: client.ApiClient,
        *,
        listen: tuple[str, int],
        namespaces: tuple[str, ...] = (),
        interval_s: float = 3.0,
        timeout_s: float = 5.0,
        on_change: OnChange | None = None,
    ) -> None:
        self.identity = identity
        self.party = identity.party
        self.api = api
        self.listen = listen
        self.namespaces = namespaces
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.ttl_s = 3 * interval_s + timeout_s
        self.on_change = on_change
        self.server_ctx = tls.server_context(identity)
        self._trusted: set[bytes] = set()
        self._lock = threading.Lock()
        self._peers: list[ChaosPeer] = []
        self._local: dict[Key, PublishedJob] = {}
        self._records: dict[Key, PeerRecord] = {}
        self._failures: dict[Key, str] = {}
        self._views: dict[Key, tuple[FederationView, dict[str, str]]] = {}
        self._appeared: dict[Key, float] = {}
        """When each local job was first published (monotonic)."""
        self._refusals: set[str] = set()
        """Reasons for refusing a client already logged (bounded)."""
        self._worker_cas: dict[Key, tuple[str, x509.Certificate]] = {}
        """ChaosPeer -> (its party, the last good worker CA it sent)."""
        self.refused_cas: Counter[str] = Counter()
        """Worker CAs refused, by party."""
        self.worker_ca: Callable[[str], bytes | None] | None = None
        """Our worker CA of a namespace (PEM), to send to the peers there; None: none yet."""
        self._started = time.monotonic()
        self._runner: web.AppRunner | None = None
        self._task: asyncio.Task | None = None

    # ------------------------------------------------------------ for the reconciles

    def publish(self, job: PublishedJob) -> None:
        with self._lock:
            self._local[(job.namespace, job.name)] = job
            self._appeared.setdefault((job.namespace, job.name), time.monotonic())

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._local.pop((namespace, name), None)
            self._appeared.pop((namespace, name), None)

    def view(self, namespace: str, federation: str, name: str | None = None) -> FederationView:
        """What job `name` (of `federation`, in `namespace`) knows of the other parties."""
        with self._lock:
            peers = [p for p in self._peers if p.metadata.namespace == namespace]
            records, failures = dict(self._records), dict(self._failures)
            since = self._appeared.get((namespace, name or ""))
        now = time.monotonic()
        return job_view(
            self.party,
            federation,
            peers,
            records,
            failures,
            now=now,
            ttl_s=self.ttl_s,
            since=max(since or now, self._started),
        )

    def worker_trust(self, namespace: str) -> dict[str, x509.Certificate]:
        """The other parties' worker CAs our pods in `namespace` trust: party -> its CA (the
        first ChaosPeer of the namespace naming it, by name)."""
        with self._lock:
            cas = sorted((k, v) for k, v in self._worker_cas.items() if k[0] == namespace)
        trust: dict[str, x509.Certificate] = {}
        for _, (party, cert) in cas:
            trust.setdefault(party, cert)
        return trust

    def _take_ca(self, keys: list[Key], party: str, message: SyncMessage) -> None:
        """Keep the worker CA `message` carries for the ChaosPeers `keys` of `party`, if it
        passes `peer_ca`; else log once, count and ignore it."""
        if message.worker_ca is None or party == self.party:
            return
        try:
            cert = peer_ca(message.worker_ca, datetime.now(UTC))
        except IdentityError as exc:
            self.refused_cas[party] += 1
            self._warn_once(f"federation: ignored the worker CA party {party} sent: {exc}")
            return
        with self._lock:
            for key in keys:
                self._worker_cas[key] = (party, cert)

    def _outgoing(self, peer: ChaosPeer, local: list[PublishedJob]) -> bytes:
        """Our message for `peer`, with our worker CA of its namespace."""
        message = outgoing(self.party, peer, local)
        own = self.worker_ca(peer_key(peer)[0]) if self.worker_ca else None
        if own is not None:
            message = message.model_copy(update={"worker_ca": own.decode()})
        return message.encode()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Serve, and keep syncing with the peers in the background. The peers are listed
        before this returns, so that the first reconciles already know whom to wait for."""
        await self.serve()
        self._started = time.monotonic()
        try:
            self.set_peers(await asyncio.to_thread(self._list_peers))
        except Exception as exc:  # the loop lists them again
            log.warning("federation: ChaosPeers not listed yet: %s", exc)
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def serve(self) -> int:
        """Start the HTTPS server; returns the port it listens on."""
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post(SYNC_PATH, self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        host, port = self.listen
        site = web.TCPSite(self._runner, host, port, ssl_context=self.server_ctx)
        await site.start()
        port = self._runner.addresses[0][1]  # the real one when asked for port 0
        log.info("federation: party %s (%s) serves on %s:%d", self.party,
                 self.identity.fingerprint, host, port)  # fmt: skip
        return port

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._runner is not None:
            await self._runner.cleanup()

    async def _loop(self) -> None:
        while True:
            try:
                await self.sync_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep syncing whatever one round met
                log.warning("federation sync failed: %s", exc)
            await asyncio.sleep(self.interval_s)

    # ---------------------------------------------------------------------- server

    async def _handle(self, request: web.Request) -> web.Response:
        sslobj = request.transport and request.transport.get_extra_info("ssl_object")
        der = sslobj.getpeercert(binary_form=True) if sslobj else None
        with self._lock:
            peers = list(self._peers)
        matched, why = tls.match_client(peers, der)
        if not matched:
            self._refused(request.remote, why)
            return web.json_response({"error": "unknown party"}, status=403)
        matched.sort(key=peer_key)
        party = matched[0].spec.party
        try:
            message = SyncMessage.decode(await request.read())
        except (ValidationError, ValueError) as exc:
            return web.json_response({"error": f"invalid message: {exc}"[:500]}, status=400)
        if message.party != party or party == self.party:
            self._refused(request.remote, f"PartyMismatch: message from {message.party} over "
                          f"a certificate of party {party}")  # fmt: skip
            return web.json_response({"error": "party does not match certificate"}, status=403)
        now = time.monotonic()
        with self._lock:
            for peer in matched:
                self._records[peer_key(peer)] = PeerRecord(party, message, now)
            local = list(self._local.values())
        self._take_ca([peer_key(p) for p in matched], party, message)
        return web.Response(
            body=self._outgoing(matched[0], local),
            content_type="application/json",
        )

    def _refused(self, remote: str | None, why: str) -> None:
        """Log a refused client, once per reason."""
        self._warn_once(f"federation: refused a client at {remote}: {why}")

    def _warn_once(self, text: str) -> None:
        """Log a warning once (at most 256 remembered)."""
        if text in self._refusals:
            return
        if len(self._refusals) >= 256:
            self._refusals.clear()
        self._refusals.add(text)
        log.warning("%s", text)

    # --------------------------------------------------------------------- client

    def _list_peers(self) -> list[ChaosPeer]:
        peers = []
        for item in list_objects(self.api, self.namespaces, PEERS):
            try:
                peers.append(ChaosPeer.model_validate(item))
            except ValidationError as exc:
                log.warning("ChaosPeer %s ignored: %s", item["metadata"].get("name"), exc)
        return peers

    def set_peers(self, peers: Iterable[ChaosPeer]) -> None:
        """The ChaosPeer objects in force: trust their CA bundles, forget removed peers."""
        peers = list(peers)
        for peer in peers:
            if peer.spec.ca_bundle:
                self._trust(peer.spec.ca_bundle.encode())
        with self._lock:
            self._peers = peers
            keys = {peer_key(p) for p in peers}
            for stale in set(self._records) - keys:
                del self._records[stale]
            for stale in set(self._worker_cas) - keys:
                del self._worker_cas[stale]

    def _trust(self, pem: bytes) -> None:
        with self._lock:
            if pem not in self._trusted:
                tls.trust(self.server_ctx, pem)
                self._trusted.add(pem)

    def _trust_key(self, cert: Any) -> None:
        """A pinned peer's certificate passed its check: accept it as a client from now on."""
        self._trust(tls.pem_of(cert))

    def exchange(self, peer: ChaosPeer) -> ExchangeOutcome:
        """One exchange with a peer (blocking); records what it said."""
        key = peer_key(peer)
        with self._lock:
            local = list(self._local.values())
        try:
            answer = tls.exchange(
                self.identity,
                peer,
                SYNC_PATH,
                self._outgoing(peer, local),
                timeout_s=self.timeout_s,
                max_bytes=MAX_BODY_BYTES,
                on_verified=self._trust_key if peer.spec.key_fingerprint else None,
            )
            try:
                message = SyncMessage.decode(answer.body)
            except (ValidationError, ValueError) as exc:
                raise tls.PeerError("BadResponse", f"invalid message: {exc}"[:500]) from None
            if message.party != answer.party:
                raise tls.PeerError(
                    "PartyMismatch",
                    f"message from {message.party} over a certificate of {answer.party}",
                )
        except tls.PeerError as exc:
            with self._lock:
                changed = self._failures.get(key) != exc.reason
                self._failures[key] = exc.reason
                if exc.reason in TRUST_FAILURES:
                    self._records.pop(key, None)
                    self._worker_cas.pop(key, None)
            if changed and exc.reason in TRUST_FAILURES:
                log.warning("federation: ChaosPeer %s/%s distrusted: %s (%s)", *key, exc,
                            exc.reason)  # fmt: skip
            return ExchangeOutcome(False, exc.reason, str(exc))
        with self._lock:
            self._failures.pop(key, None)
            self._records[key] = PeerRecord(answer.party, message, time.monotonic())
        self._take_ca([key], answer.party, message)
        return ExchangeOutcome(True, "Synced", f"exchanged with party {answer.party}", answer.party)

    async def sync_once(self) -> None:
        """One round: list peers, exchange with each, write their status, signal changes."""
        peers = await asyncio.to_thread(self._list_peers)
        self.set_peers(peers)
        outcomes = await asyncio.gather(*(asyncio.to_thread(self.exchange, p) for p in peers))
        with self._lock:
            local = list(self._local.values())
        for peer, outcome in zip(peers, outcomes, strict=True):
            await asyncio.to_thread(self._write_status, peer, outcome, local)
        await self._signal_changes()

    def _write_status(
        self, peer: ChaosPeer, outcome: ExchangeOutcome, local: list[PublishedJob]
    ) -> None:
        namespace, name = peer_key(peer)
        federations = {j.federation for j in local if j.namespace == namespace}
        with self._lock:
            record = self._records.get((namespace, name))
        previous = peer.status.to_k8s() if peer.status else {}
        status, event = peer_status(
            previous,
            outcome,
            members=remote_members_here(peer, record, federations),
            generation=peer.metadata.generation,
            now=datetime.now(UTC),
        )
        if status_unchanged(previous, status):
            return
        custom = client.CustomObjectsApi(self.api)
        try:
            custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, PEERS, name, {"status": status}
            )
        except ApiException as exc:
            if exc.status != 404:
                log.warning("status of ChaosPeer %s/%s not written: %s", namespace, name,
                            exc.reason)  # fmt: skip
            return
        if event is not None:
            post_event(client.CoreV1Api(self.api), peer.to_k8s(), *event)

    async def _signal_changes(self) -> None:
        with self._lock:
            jobs = list(self._local.values())
        changed = []
        for job in jobs:
            view = self.view(job.namespace, job.federation, job.name)
            trust = {p: spki_fingerprint(c) for p, c in self.worker_trust(job.namespace).items()}
            key = (job.namespace, job.name)
            if self._views.get(key) != (view, trust):  # a new worker CA: new trust bundles
                self._views[key] = (view, trust)
                changed.append(key)
        if self.on_change is not None:
            for namespace, name in changed:
                await self.on_change(namespace, name)
