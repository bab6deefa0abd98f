"""Federated worker identities (issue #15): parties exchange their worker CAs over the
federation sync, each cross-certifies the others' under a URI name constraint, and a worker
of one party then trusts the workers of another, but only as members of that party.

Real certificates, the real sync between two `FederationService`s over mutual TLS, and real
TLS 1.3 worker links on loopback. The trust bundles are built from what the sync brought
(`WorkerAuthority.bundle(service.worker_trust(namespace))`), as the operator builds the
pods' `ca.crt`. A refusal is observed as a closed connection with nothing delivered, beside
a positive control on the same server.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from chaos_operator.federation import identity as ident
from chaos_operator.federation.workerca import WorkerAuthority
from chaos_worker.config import TlsFiles
from chaos_worker.net.signing import Signer, Verifier
from chaos_worker.net.tls import LinkTls
from chaos_worker.net.wire import Hello, Ping
from cryptography.hazmat.primitives import serialization

from tests.security.test_forged_messages import heartbeat
from tests.security.test_identities import client_context, frames, open_link, secure, send_raw
from tests.transportkit import DEADLINE_S, close_all, until
from tests.unit.test_federation_tls import Party, make_identity, peer

pytestmark = pytest.mark.security


def authority(party: str) -> WorkerAuthority:
    """A federating party's worker CA, as the operator makes it (may cross-certify)."""
    return WorkerAuthority.create(party, days=30, path_length=1)


def posing_as(party: str, real: WorkerAuthority) -> WorkerAuthority:
    """`real`'s CA (its name and key) issuing certificates that name `party`."""
    key = serialization.load_pem_private_key(real.key_pem, None)
    return WorkerAuthority(party, key, real.certificate)  # type: ignore[arg-type]


def member_files(directory: Path, issuer: WorkerAuthority, member: str, bundle: bytes) -> TlsFiles:
    """A member's certificate (from `issuer`), key and trust bundle, as a pod mounts them."""
    directory.mkdir(parents=True, exist_ok=True)
    issued = issuer.issue(member)
    paths = [directory / f"{member}.{ext}" for ext in ("crt", "key", "ca")]
    for path, data, mode in zip(
        paths, (issued.cert, issued.key, bundle), (0o644, 0o600, 0o644), strict=True
    ):
        ident.write_file(path, data, mode)
    return TlsFiles(cert=str(paths[0]), key=str(paths[1]), ca=str(paths[2]))


@pytest.fixture
def synced(tmp_path: Path) -> Iterator[dict]:
    """alpha and beta, whose operators have exchanged their worker CAs by one real sync."""
    ids = {name: make_identity(tmp_path, name) for name in ("alpha", "beta")}
    cas = {name: authority(name) for name in ("alpha", "beta")}
    alpha, beta = Party(ids["alpha"]), Party(ids["beta"])
    for name, party in (("alpha", alpha), ("beta", beta)):
        party.service.worker_ca = lambda ns, name=name: cas[name].cert_pem if ns == "ns" else None
    alpha.service.set_peers([peer("beta", beta.port, bundle=ids["beta"].ca_cert)])
    beta.service.set_peers([peer("alpha", alpha.port, bundle=ids["alpha"].ca_cert)])
    outcome = alpha.service.exchange(peer("beta", beta.port, bundle=ids["beta"].ca_cert))
    assert outcome.ok, outcome
    yield {"ids": ids, "cas": cas, "alpha": alpha, "beta": beta, "dir": tmp_path}
    alpha.close()
    beta.close()


def bundles(synced: dict) -> dict[str, bytes]:
    """Each party's pods' `ca.crt`, from what its operator's sync brought."""
    return {
        name: synced["cas"][name].bundle(synced[name].service.worker_trust("ns"))
        for name in ("alpha", "beta")
    }


def test_the_sync_carries_each_partys_worker_ca_both_ways(synced: dict) -> None:
    cas = synced["cas"]
    # one exchange, started by alpha: alpha took beta's CA from the answer, beta alpha's
    # from the request; by the party the ChaosPeer names
    assert synced["alpha"].service.worker_trust("ns") == {"beta": cas["beta"].certificate}
    assert synced["beta"].service.worker_trust("ns") == {"alpha": cas["alpha"].certificate}
    assert synced["alpha"].service.worker_trust("elsewhere") == {}


def test_a_worker_of_another_party_is_trusted_as_that_partys_member(synced: dict) -> None:
    cas, ca_files, tmp = synced["cas"], bundles(synced), synced["dir"]

    async def scenario() -> None:
        a0 = await secure("alpha.w0", member_files(tmp / "a", cas["alpha"], "alpha.w0",
                                                   ca_files["alpha"]))  # fmt: skip
        b0 = await secure("beta.w0", member_files(tmp / "b", cas["beta"], "beta.w0",
                                                  ca_files["beta"]))  # fmt: skip
        b0.transport.connect("alpha.w0", a0.address)
        b0.transport.send("alpha.w0", Ping(sender="beta.w0", sent_at=1.0))
        a0.transport.connect("beta.w0", b0.address)
        a0.transport.send("beta.w0", Ping(sender="alpha.w0", sent_at=2.0))
        await until(lambda: a0.got and b0.got, "a ping each way")
        assert [(s, m.sent_at) for s, m, _ in a0.got] == [("beta.w0", 1.0)]
        assert [(s, m.sent_at) for s, m, _ in b0.got] == [("alpha.w0", 2.0)]
        await close_all(a0, b0)

    asyncio.run(scenario())


def test_a_party_cannot_mint_a_member_of_another_party(synced: dict) -> None:
    """Beta's CA (trusted by alpha for beta) issues `chaos://alpha/alpha.w1`, and
    `chaos://beta/alpha.w1` (its own party, alpha's member id). Neither may speak as alpha's
    w1: the first fails the handshake (OpenSSL: the cross certificate's name constraint), the
    second is refused after it (a member of beta must be named `beta.<...>`)."""
    cas, ca_files, tmp = synced["cas"], bundles(synced), synced["dir"]
    alpha_bundle = tmp / "alpha-ca.crt"
    alpha_bundle.write_bytes(ca_files["alpha"])
    spoof = member_files(tmp / "s", posing_as("alpha", cas["beta"]), "alpha.w1", ca_files["beta"])
    own_party = member_files(tmp / "o", cas["beta"], "alpha.w1", ca_files["beta"])
    honest = member_files(tmp / "h", cas["beta"], "beta.w2", ca_files["beta"])

    async def scenario() -> None:
        a0 = await secure("alpha.w0", member_files(tmp / "a", cas["alpha"], "alpha.w0",
                                                   ca_files["alpha"]))  # fmt: skip
        as_w1 = frames(Hello(sender="alpha.w1"), Ping(sender="alpha.w1", sent_at=6.0))
        for files in (spoof, own_party):
            assert (
                await send_raw(a0.address, client_context(str(alpha_bundle), files), as_w1) == b""
            )
        # a0 refuses the spoof as a server too: the handshake fails on a0's side
        server = LinkTls(spoof, "alpha.w1")
        with pytest.raises(ssl.SSLCertVerificationError) as refused:
            listener = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0,
                                                  ssl=server.server)  # fmt: skip
            port = listener.sockets[0].getsockname()[1]
            ctx = LinkTls(member_files(tmp / "a2", cas["alpha"], "alpha.w2", ca_files["alpha"]),
                          "alpha.w2").client  # fmt: skip
            try:
                await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=ctx),
                                       DEADLINE_S)  # fmt: skip
            finally:
                listener.close()
        assert refused.value.verify_message == "permitted subtree violation"
        # control: beta's CA naming its own member, in beta's name, is heard
        ok = frames(Hello(sender="beta.w2"), Ping(sender="beta.w2", sent_at=2.0))
        writer = await open_link(a0.address, client_context(str(alpha_bundle), honest))
        writer.write(ok)
        await until(lambda: len(a0.got) == 1, "beta.w2's ping")
        assert [(s, m.sent_at) for s, m, _ in a0.got] == [("beta.w2", 2.0)]
        writer.close()
        await close_all(a0)

    asyncio.run(scenario())


def test_a_ca_that_was_not_exchanged_is_refused(synced: dict) -> None:
    cas, ca_files, tmp = synced["cas"], bundles(synced), synced["dir"]
    alpha_bundle = tmp / "alpha-ca.crt"
    alpha_bundle.write_bytes(ca_files["alpha"])
    gamma = authority("gamma")
    stranger = member_files(tmp / "g", gamma, "gamma.w0", gamma.cert_pem)

    async def scenario() -> None:
        a0 = await secure("alpha.w0", member_files(tmp / "a", cas["alpha"], "alpha.w0",
                                                   ca_files["alpha"]))  # fmt: skip
        hello = frames(Hello(sender="gamma.w0"), Ping(sender="gamma.w0", sent_at=1.0))
        assert await send_raw(a0.address, client_context(str(alpha_bundle), stranger), hello) == b""
        assert a0.got == []
        await close_all(a0)

    asyncio.run(scenario())


def test_seals_honour_the_party_a_ca_is_bound_to(synced: dict) -> None:
    """A seal is checked outside a TLS chain: the Verifier applies the cross certificate's
    constraint itself."""
    cas, ca_files, tmp = synced["cas"], bundles(synced), synced["dir"]
    alpha_bundle = tmp / "alpha-ca.crt"
    alpha_bundle.write_bytes(ca_files["alpha"])
    verifier = Verifier(str(alpha_bundle))
    beta_issued = member_files(tmp / "b", cas["beta"], "beta.w0", ca_files["beta"])
    assert verifier.check(Signer(beta_issued, "beta.w0").seal(heartbeat("beta.w0"))) is None
    for name, issuer in (("s", posing_as("alpha", cas["beta"])), ("o", cas["beta"])):
        forged = member_files(tmp / name, issuer, "alpha.w1", ca_files["beta"])
        why = verifier.check(Signer(forged, "alpha.w1").seal(heartbeat("alpha.w1")))
        assert why is not None and "may not issue" in why
    own = member_files(tmp / "a", cas["alpha"], "alpha.w1", ca_files["alpha"])
    assert verifier.check(Signer(own, "alpha.w1").seal(heartbeat("alpha.w1"))) is None


def not_a_ca(tmp: Path) -> bytes:
    return ident.parse_certificate(authority("beta").issue("beta.w0").cert).public_bytes(
        serialization.Encoding.PEM
    )


def expired_ca() -> bytes:
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=40)
    return WorkerAuthority.create("beta", days=1, now=long_ago, path_length=1).cert_pem


GARBLED = b"-----BEGIN CERTIFICATE-----\nAAAAAAAA\n-----END CERTIFICATE-----\n"


@pytest.mark.parametrize(
    ("sent", "why"),
    [
        (lambda tmp: GARBLED, "not a certificate"),
        (not_a_ca, "not a CA"),
        (lambda tmp: expired_ca(), "outside its validity"),
    ],
    ids=["garbled", "leaf", "expired"],
)
def test_the_sync_refuses_a_bad_worker_ca_and_goes_on(
    synced: dict, sent, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    alpha, beta, ids, tmp = synced["alpha"], synced["beta"], synced["ids"], synced["dir"]
    good = synced["cas"]["beta"].certificate
    beta.service.worker_ca = lambda ns: sent(tmp)
    with caplog.at_level(logging.WARNING, "chaos_operator.federation"):
        outcome = alpha.service.exchange(peer("beta", beta.port, bundle=ids["beta"].ca_cert))
    assert outcome.ok  # the rest of the message is taken
    assert alpha.service.refused_cas["beta"] == 1
    assert alpha.service.worker_trust("ns") == {"beta": good}  # the last good one stays
    assert any(why in r.getMessage() and "party beta" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "sent",
    [b"not a certificate at all", authority("beta").cert_pem * 2, GARBLED * 200],
    ids=["text", "two", "oversize"],
)
def test_a_worker_ca_that_is_not_one_pem_certificate_fails_the_message(
    synced: dict, sent: bytes
) -> None:
    """Like any malformed field: the message is refused whole, before anything reads it."""
    alpha, beta, ids = synced["alpha"], synced["beta"], synced["ids"]
    beta.service.worker_ca = lambda ns: sent
    outcome = alpha.service.exchange(peer("beta", beta.port, bundle=ids["beta"].ca_cert))
    assert (outcome.ok, outcome.reason) == (False, "BadResponse")
