"""Mutual TLS between party operators on real loopback sockets: pinning by fingerprint and by
CA bundle, and every way a client or server that is not pinned is refused."""

from __future__ import annotations

import asyncio
import http.client
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from chaos_operator.api import ChaosPeer
from chaos_operator.federation import identity as ident
from chaos_operator.federation import tls
from chaos_operator.federation.protocol import SYNC_PATH, SyncMessage
from chaos_operator.federation.rules import PublishedJob
from chaos_operator.federation.service import FederationService

pytestmark = pytest.mark.unit


def make_identity(tmp: Path, party: str, sans: tuple[str, ...] = ident.DEFAULT_SANS):
    ident.write(ident.create(party, sans), tmp / party)
    return ident.load(tmp / party)


def peer(name: str, port: int, *, fingerprint: str | None = None, bundle: bytes | None = None,
         ns: str = "ns", party: str | None = None, **policy: Any) -> ChaosPeer:  # fmt: skip
    """A ChaosPeer `name` for the party `party` (default: `name`) on loopback `port`."""
    spec: dict[str, Any] = {
        "party": party or name,
        "endpoint": f"https://127.0.0.1:{port}",
        "policy": policy,
    }
    if fingerprint:
        spec["keyFingerprint"] = fingerprint
    if bundle:
        spec["caBundle"] = bundle.decode()
    return ChaosPeer.model_validate(
        {"metadata": {"name": name, "namespace": ns, "uid": f"uid-{name}"}, "spec": spec}
    )


class Party:
    """A FederationService serving on loopback in a background event loop (no API server)."""

    def __init__(self, identity: ident.Identity) -> None:
        self.service = FederationService(identity, api=None, listen=("127.0.0.1", 0))
        self.loop = asyncio.new_event_loop()
        self.port = self.loop.run_until_complete(self.service.serve())
        self._thread = __import__("threading").Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.service.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    def records(self) -> dict:
        return dict(self.service._records)


@pytest.fixture
def parties(tmp_path: Path) -> Iterator[dict[str, Any]]:
    ids = {name: make_identity(tmp_path, name) for name in ("alpha", "beta", "gamma")}
    alpha, beta = Party(ids["alpha"]), Party(ids["beta"])
    members = {"alpha.digits-w0": "127.0.0.1:7070"}
    alpha.service.publish(PublishedJob("ns", "digits", "mnist", members, 2))
    beta.service.publish(PublishedJob("ns", "digits", "mnist", {}, 1))
    yield {"ids": ids, "alpha": alpha, "beta": beta}
    alpha.close()
    beta.close()


def test_pinned_fingerprints_federate_both_ways(parties: dict[str, Any]) -> None:
    ids, alpha, beta = parties["ids"], parties["alpha"], parties["beta"]
    to_beta = peer("beta", beta.port, fingerprint=ids["beta"].fingerprint)
    to_alpha = peer("alpha", alpha.port, fingerprint=ids["alpha"].fingerprint, maxWorkers=3)
    alpha.service.set_peers([to_beta])
    beta.service.set_peers([to_alpha])

    # alpha has not seen beta's key yet: its server cannot verify beta's client certificate.
    # beta, though, has checked alpha's key against its pin (TLS 1.3) and trusts it now ...
    first = beta.service.exchange(to_alpha)
    assert (first.ok, first.reason) == (False, "Rejected"), first
    assert not alpha.records()

    # ... so alpha's request is accepted, and alpha in turn trusts beta's checked key ...
    outcome = alpha.service.exchange(to_beta)
    assert (outcome.ok, outcome.party) == (True, "beta"), outcome
    heard = alpha.service.view("ns", "mnist")
    assert [(r.party, r.replicas, r.members) for r in heard.remotes] == [("beta", 1, {})]
    # ... so beta's requests are accepted from then on, and each side learns the other's jobs.
    again = beta.service.exchange(to_alpha)
    assert again.ok, again
    view = beta.service.view("ns", "mnist")
    (remote,) = view.remotes
    assert remote.party == "alpha"
    assert remote.members == {"alpha.digits-w0": "127.0.0.1:7070"}
    assert remote.admits_us and remote.max_workers is None
    assert view.seed(1) == (remote, "alpha.digits-w0", "127.0.0.1:7070")
    # alpha's server stored beta's message too, with beta's admission decision for alpha.
    assert alpha.records()[("ns", "beta")].message.federation("mnist").max_workers == 3


def test_wrong_fingerprint_is_refused_before_anything_is_sent(parties: dict[str, Any]) -> None:
    ids, alpha, beta = parties["ids"], parties["alpha"], parties["beta"]
    alpha.service.set_peers([peer("beta", beta.port, fingerprint=ids["beta"].fingerprint)])
    wrong = peer("alpha", alpha.port, fingerprint=ids["gamma"].fingerprint)
    beta.service.set_peers([wrong])
    beta.service.exchange(wrong)
    alpha.service.exchange(alpha.service._peers[0])  # alpha now trusts beta's key
    outcome = beta.service.exchange(wrong)
    assert (outcome.ok, outcome.reason) == (False, "FingerprintMismatch"), outcome
    assert ids["alpha"].fingerprint in outcome.message
    assert not alpha.records(), "beta sent its message to a server it did not trust"
    assert beta.service.view("ns", "mnist").remotes == ()


def test_server_refuses_unknown_and_missing_client_certificates(
    parties: dict[str, Any], tmp_path: Path
) -> None:
    ids, alpha = parties["ids"], parties["alpha"]
    alpha.service.set_peers([peer("beta", 1, fingerprint=ids["beta"].fingerprint)])
    gamma = FederationService(ids["gamma"], api=None, listen=("127.0.0.1", 0))
    # an unknown party (its key is pinned nowhere, its CA trusted nowhere)
    outcome = gamma.exchange(peer("alpha", alpha.port, fingerprint=ids["alpha"].fingerprint))
    assert (outcome.ok, outcome.reason) == (False, "Rejected"), outcome
    # no client certificate at all
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    conn = http.client.HTTPSConnection("127.0.0.1", alpha.port, timeout=5, context=ctx)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        conn.request("POST", SYNC_PATH, body=b"{}")
        conn.getresponse().read()
    conn.close()
    assert not alpha.records()


def test_an_anchor_of_a_removed_pin_grants_nothing(parties: dict[str, Any]) -> None:
    ids, alpha, beta = parties["ids"], parties["alpha"], parties["beta"]
    to_beta = peer("beta", beta.port, fingerprint=ids["beta"].fingerprint)
    to_alpha = peer("alpha", alpha.port, fingerprint=ids["alpha"].fingerprint)
    alpha.service.set_peers([to_beta])
    beta.service.set_peers([to_alpha])
    beta.service.exchange(to_alpha)  # beta learns alpha's key
    assert alpha.service.exchange(to_beta).ok  # beta's key is now a trust anchor of alpha
    # alpha's admin re-pins beta to another key: beta's handshake still verifies, but the
    # request is refused because no ChaosPeer matches it any more.
    repinned = peer("beta", beta.port, fingerprint=ids["gamma"].fingerprint)
    alpha.service.set_peers([repinned])
    before = alpha.records()
    outcome = beta.service.exchange(to_alpha)
    assert (outcome.ok, outcome.reason) == (False, "Rejected"), outcome
    assert "does not know us" in outcome.message
    assert alpha.records() == before  # nothing stored from beta's refused request
    # alpha's own next exchange finds the key changed and drops what beta said before
    assert alpha.service.exchange(repinned).reason == "FingerprintMismatch"
    assert not alpha.records() and alpha.service.view("ns", "mnist").remotes == ()


def test_ca_bundles_verify_the_chain_and_the_host(parties: dict[str, Any], tmp_path: Path) -> None:
    ids, alpha, beta = parties["ids"], parties["alpha"], parties["beta"]
    to_beta = peer("beta", beta.port, bundle=ids["beta"].ca_cert)
    to_alpha = peer("alpha", alpha.port, bundle=ids["alpha"].ca_cert)
    alpha.service.set_peers([to_beta])
    beta.service.set_peers([to_alpha])
    # no prior handshake needed: each server trusts the other's CA from the ChaosPeer
    assert beta.service.exchange(to_alpha).ok
    assert alpha.service.exchange(to_beta).ok
    assert alpha.service.view("ns", "mnist").remotes[0].party == "beta"
    # a bundle of another CA: the chain does not verify
    other = peer("alpha", alpha.port, bundle=ids["gamma"].ca_cert)
    outcome = beta.service.exchange(other)
    assert (outcome.ok, outcome.reason) == (False, "CertificateInvalid"), outcome
    # a certificate of the right CA for another host name: the host check fails
    elsewhere = make_identity(tmp_path / "x", "delta", ("chaos.delta.example",))
    delta = Party(elsewhere)
    try:
        outcome = alpha.service.exchange(peer("delta", delta.port, bundle=elsewhere.ca_cert))
        assert (outcome.ok, outcome.reason) == (False, "CertificateInvalid"), outcome
        assert "mismatch" in outcome.message.lower() or "match" in outcome.message.lower()
    finally:
        delta.close()


def test_server_checks_the_message(parties: dict[str, Any]) -> None:
    ids, alpha = parties["ids"], parties["alpha"]
    alpha.service.set_peers([peer("beta", 1, bundle=ids["beta"].ca_cert)])
    to_alpha = peer("alpha", alpha.port, fingerprint=ids["alpha"].fingerprint)
    for body, status in (
        (b"not json", 400),
        (SyncMessage(party="beta").encode().replace(b'"version":1', b'"version":2'), 400),
        (SyncMessage(party="gamma").encode(), 403),  # claims another party than its cert
    ):
        with pytest.raises(tls.PeerError) as err:
            tls.exchange(ids["beta"], to_alpha, SYNC_PATH, body)
        assert err.value.reason == ("BadResponse" if status == 400 else "Rejected"), body
    assert not alpha.records()
    answer = tls.exchange(ids["beta"], to_alpha, SYNC_PATH, SyncMessage(party="beta").encode())
    reply = SyncMessage.decode(answer.body)
    assert reply.party == "alpha" and reply.federations[0].members == {
        "alpha.digits-w0": "127.0.0.1:7070"
    }
