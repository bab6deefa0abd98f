"""A party's own worker CA is bound to its party (issue #15): a new CA that signs leaves
only carries a critical NameConstraints extension permitting URIs of its own party, the
form the cross certificates of a federation use, so even its leaked key mints no member of
another party that a verifier accepts.

Real certificates and real TLS 1.3: OpenSSL (Python's `ssl`) refuses the handshake of a
leaf for another party's member signed with the run CA's own key, either way, and the
refusal is counted (`bad_name`); the `Verifier` refuses its seals. The party's own members,
and a CA made before CAs were bound (no constraint), work as before.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from pathlib import Path

import pytest
from chaos_operator.federation.identity import (
    issue,
    private_pem,
    self_signed_ca,
    write_file,
)
from chaos_operator.federation.workerca import (
    LEEWAY,
    WorkerAuthority,
    WorkerCA,
    party_constraint,
)
from chaos_worker.config import TlsFiles, member_uri
from chaos_worker.net.signing import Signer, Verifier
from chaos_worker.net.tls import LinkTls, bound_parties
from chaos_worker.net.wire import Hello, Ping, StateWitness
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from tests.security.test_identities import client_context, frames, open_link, send_raw
from tests.security.test_refused_handshakes import HELLO_PING, refused, worker
from tests.transportkit import close_all, until

pytestmark = pytest.mark.security


def minted(ca: WorkerCA, party: str, member: str) -> TlsFiles:
    """A leaf for `chaos://<party>/<member>` signed with the CA's own key, as whoever holds
    a leaked `ca.key` would make it."""
    key = serialization.load_pem_private_key((ca.directory / "ca.key").read_bytes(), None)
    authority = x509.load_pem_x509_certificate(ca.ca_file.read_bytes())
    start = dt.datetime.now(dt.UTC) - LEEWAY
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, member)])
    san = [x509.UniformResourceIdentifier(member_uri(party, member))]
    end = start + dt.timedelta(days=1)
    leaf_key, leaf = issue(key, authority.subject, subject, san, start, end)
    cert, key_file = ca.directory / f"minted-{member}.crt", ca.directory / f"minted-{member}.key"
    write_file(cert, leaf.public_bytes(serialization.Encoding.PEM), 0o644)
    write_file(key_file, private_pem(leaf_key), 0o600)
    return TlsFiles(cert=str(cert), key=str(key_file), ca=str(ca.ca_file))


def witness(files: TlsFiles, member: str) -> StateWitness:
    """A message sealed with `files` in `member`'s name."""
    word = StateWitness(sender=member, step=1, epoch=1, state_sha256="0" * 64)
    return Signer(files, member).seal(word)


def test_a_new_ca_that_signs_leaves_only_is_bound_to_its_party(ca: WorkerCA) -> None:
    cert = x509.load_pem_x509_certificate(ca.ca_file.read_bytes())
    constraint = cert.extensions.get_extension_for_class(x509.NameConstraints)
    assert constraint.critical and constraint.value == party_constraint("local")
    assert bound_parties(cert) == {"local"}
    # a federating CA cross-certifies other parties, whose members are below it: unbound
    federating = WorkerAuthority.create("alpha", days=1, path_length=1).certificate
    assert bound_parties(federating) is None


def test_a_leaked_key_mints_no_member_of_another_party_that_a_handshake_accepts(
    ca: WorkerCA,
) -> None:
    async def scenario() -> None:
        w0, metrics = await worker("w0", ca.issue("w0"))
        # the run's own member is accepted, its frames delivered
        w1 = client_context(str(ca.ca_file), ca.issue("w1"))
        writer = await open_link(w0.address, w1)
        writer.write(HELLO_PING)
        await until(lambda: len(w0.got) == 1, "w1's ping")
        writer.close()
        # beta's member, and one named in beta's name, minted with the run CA's key
        for member in ("beta.w0", "w0"):
            forged = client_context(str(ca.ca_file), minted(ca, "beta", member))
            hello = frames(Hello(sender=member), Ping(sender=member, sent_at=1.0))
            assert await send_raw(w0.address, forged, hello) == b""
        await until(lambda: refused(metrics).get("bad_name") == 2, "both refused")
        assert len(w0.got) == 1 and set(refused(metrics)) == {"bad_name"}
        # as a server: a worker of the run does not take it for anyone either
        impostor = LinkTls(minted(ca, "beta", "beta.w1"), "beta.w1")
        listener = await asyncio.start_server(
            lambda _r, w: w.close(), "127.0.0.1", 0, ssl=impostor.server
        )
        port = listener.sockets[0].getsockname()[1]
        with pytest.raises(ssl.SSLCertVerificationError) as refusal:
            ctx = LinkTls(ca.issue("w2"), "w2").client
            await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
        assert refusal.value.verify_message == "permitted subtree violation"
        listener.close()
        await close_all(w0)

    asyncio.run(scenario())


def test_a_leaked_key_mints_no_seal_of_another_party_and_own_seals_verify(
    ca: WorkerCA,
) -> None:
    verifier = Verifier(str(ca.ca_file))
    assert verifier.check(witness(ca.issue("w3"), "w3")) is None
    for member in ("beta.w0", "w0"):
        reason = verifier.check(witness(minted(ca, "beta", member), member))
        assert reason == f"a certificate its CA may not issue (beta/{member})"


def test_a_ca_made_before_cas_were_bound_still_works(tmp_path: Path) -> None:
    """An unconstrained CA (an operator's Secret or a run directory from before): its
    members' handshakes and seals are accepted as they were."""
    start = dt.datetime.now(dt.UTC) - LEEWAY
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "local"),
            x509.NameAttribute(NameOID.COMMON_NAME, "local chaos worker CA"),
        ]
    )
    key, cert = self_signed_ca(name, start, start + dt.timedelta(days=1))
    old = WorkerCA(tmp_path / "old-ca", "local")
    old.authority = WorkerAuthority("local", key, cert)
    write_file(old.ca_file, old.authority.cert_pem, 0o644)
    assert bound_parties(cert) is None

    async def scenario() -> None:
        w0, metrics = await worker("w0", old.issue("w0"))
        w1 = client_context(str(old.ca_file), old.issue("w1"))
        writer = await open_link(w0.address, w1)
        writer.write(HELLO_PING)
        await until(lambda: len(w0.got) == 1, "w1's ping")
        writer.close()
        assert refused(metrics) == {}
        await close_all(w0)

    asyncio.run(scenario())
    assert Verifier(str(old.ca_file)).check(witness(old.issue("w3"), "w3")) is None
