"""Mutually authenticated TLS between party operators, pinned by `ChaosPeer` objects.

Trust is never the public PKI: a peer is trusted through its `ChaosPeer`, either

* `caBundle`: ordinary chain verification against that bundle only (and the endpoint's host
  name), or
* `keyFingerprint`: no CA check; right after the handshake, and before a byte of the request
  is sent, the SHA-256 of the leaf's SubjectPublicKeyInfo must equal the pin and the leaf must
  be within its validity dates.

Either way the certificate's common name must be the party the `ChaosPeer` names
(`spec.party`): a party's CA cannot speak for another party, and a peer's messages count for
the party its ChaosPeer names and no other.

The server requires a client certificate. Python's `ssl` cannot accept an arbitrary client
certificate and judge it afterwards (there is no verify callback), so the server's trust store
holds every peer's `caBundle` and, with `VERIFY_X509_PARTIAL_CHAIN`, the leaf certificates of
fingerprint-pinned peers once an outgoing handshake has shown that their key matches the pin
(every operator uses one certificate as server and as client). TLS 1.3 is required: there the
client has checked the server's certificate before the server judges the client's, so even a
refused first attempt teaches the client the peer's key, and the next round succeeds both ways.
A client that none of the anchors verifies fails the handshake. After the handshake
`match_client` decides, from the current `ChaosPeer` objects only, which peer the client is
(anchors of deleted or re-pinned peers thus grant nothing), with the same checks of party and
dates as the client's.
"""

from __future__ import annotations

import http.client
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from chaos_operator.api import ChaosPeer
from chaos_operator.federation.identity import (
    Identity,
    IdentityError,
    parse_certificate,
    party_of,
    spki_fingerprint,
)


class PeerError(Exception):
    """A handshake or exchange with a peer failed; `reason` is a condition reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def server_context(identity: Identity) -> ssl.SSLContext:
    """TLS server context: our certificate, client certificates required, no anchors yet."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(identity.cert_file, identity.key_file)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return ctx


def trust(ctx: ssl.SSLContext, pem: str | bytes) -> None:
    """Add certificates (PEM) to a server context's trust store (takes effect at once)."""
    ctx.load_verify_locations(cadata=pem.decode() if isinstance(pem, bytes) else pem)


def client_context(identity: Identity, peer: ChaosPeer) -> ssl.SSLContext:
    """TLS client context for one peer: our certificate; the peer's bundle or no CA check."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(identity.cert_file, identity.key_file)
    if peer.spec.ca_bundle:
        ctx.load_verify_locations(cadata=peer.spec.ca_bundle)
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:  # pinned key: verified by `check_server` right after the handshake
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def issued_by_bundle(cert: x509.Certificate, bundle: str) -> bool:
    """Whether a certificate in the PEM `bundle` signed `cert` directly."""
    try:
        cas = x509.load_pem_x509_certificates(bundle.encode())
    except ValueError:
        return False
    for ca in cas:
        try:
            cert.verify_directly_issued_by(ca)
        except (InvalidSignature, ValueError, TypeError):
            continue
        return True
    return False


def dates_error(cert: x509.Certificate, now: datetime | None = None) -> PeerError | None:
    """`CertificateInvalid` if `now` lies outside the certificate's validity dates."""
    now, fmt = now or datetime.now(UTC), "%Y-%m-%dT%H:%M:%SZ"
    if now < cert.not_valid_before_utc:
        why = f"is not valid before {cert.not_valid_before_utc:{fmt}}"
    elif now > cert.not_valid_after_utc:
        why = f"expired at {cert.not_valid_after_utc:{fmt}}"
    else:
        return None
    return PeerError("CertificateInvalid", f"the peer's certificate {why}")


def party_error(peer: ChaosPeer, cert: x509.Certificate) -> PeerError | None:
    """`PartyMismatch` unless the certificate names the party that the ChaosPeer names."""
    named = party_of(cert)
    if named != peer.spec.party:
        return PeerError(
            "PartyMismatch",
            f"the certificate names party {named or '(none)'}, the ChaosPeer "
            f"{peer.metadata.name} names party {peer.spec.party}",
        )
    return None


def check_server(
    peer: ChaosPeer, leaf_der: bytes | None, now: datetime | None = None
) -> x509.Certificate:
    """After the handshake: the server's leaf must match the peer's pin (fingerprint case:
    the key and the validity dates) and name the ChaosPeer's party; PeerError otherwise."""
    if not leaf_der:
        raise PeerError("Rejected", "the peer presented no certificate")
    cert = parse_certificate(leaf_der)
    if peer.spec.key_fingerprint:
        got = spki_fingerprint(cert)
        if got != peer.spec.key_fingerprint:
            raise PeerError(
                "FingerprintMismatch",
                f"the peer's key is {got}, the ChaosPeer pins {peer.spec.key_fingerprint}",
            )
        if error := dates_error(cert, now):
            raise error
    if error := party_error(peer, cert):
        raise error
    return cert


def match_client(
    peers: Iterable[ChaosPeer], leaf_der: bytes | None, now: datetime | None = None
) -> tuple[list[ChaosPeer], str]:
    """The ChaosPeers a client certificate (verified by the TLS layer) belongs to: pinned by
    them (key or CA bundle), within its dates, naming their party. With none, why not."""
    if not leaf_der:
        return [], "no client certificate"
    try:
        cert = parse_certificate(leaf_der)
    except IdentityError:
        return [], "the client certificate does not parse"
    fingerprint = spki_fingerprint(cert)
    pinned = [
        p
        for p in peers
        if (p.spec.key_fingerprint and p.spec.key_fingerprint == fingerprint)
        or (p.spec.ca_bundle and issued_by_bundle(cert, p.spec.ca_bundle))
    ]
    if not pinned:
        return [], f"no ChaosPeer pins the key {fingerprint} or its CA"
    if error := dates_error(cert, now):
        return [], f"CertificateInvalid: {error}"
    matched = [p for p in pinned if party_error(p, cert) is None]
    if not matched:
        return [], f"PartyMismatch: {party_error(pinned[0], cert)}"
    return matched, ""


def pem_of(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class Exchange:
    """The answer of one successful exchange with a peer."""

    party: str
    """The peer's party: the one its ChaosPeer names, which its certificate names too."""
    certificate: x509.Certificate
    body: bytes


def _classify(exc: BaseException, *, connected: bool) -> PeerError:
    """A failure as a condition reason. Once our handshake is done (TLS 1.3), a TLS error or a
    closed connection means the server refused our certificate."""
    text = str(exc)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return PeerError("CertificateInvalid", f"the peer's certificate: {exc.verify_message}")
    refused = isinstance(exc, ssl.SSLError | ConnectionError | http.client.RemoteDisconnected)
    if (connected and refused) or (isinstance(exc, ssl.SSLError) and "alert" in text.lower()):
        return PeerError("Rejected", f"the peer refused our certificate ({text})")
    if isinstance(exc, ssl.SSLError):
        return PeerError("HandshakeFailed", f"TLS failed: {text}")
    return PeerError("Unreachable", f"{type(exc).__name__}: {text}")


def exchange(
    identity: Identity, peer: ChaosPeer, path: str, body: bytes, timeout_s: float = 5.0,
    max_bytes: int = 1 << 20, on_verified: Callable[[x509.Certificate], None] | None = None,
) -> Exchange:  # fmt: skip
    """POST `body` to the peer's endpoint + `path` over mutual TLS; PeerError on failure.

    Nothing is sent before the peer's certificate has been checked against its ChaosPeer;
    `on_verified` gets the certificate right then (even if the peer refuses us afterwards).
    """
    url = urlsplit(peer.spec.endpoint)
    host, port = url.hostname or "", url.port or 443
    conn = http.client.HTTPSConnection(
        host, port, timeout=timeout_s, context=client_context(identity, peer)
    )
    try:
        try:
            conn.connect()
        except (OSError, ssl.SSLError) as exc:
            raise _classify(exc, connected=False) from None
        cert = check_server(peer, conn.sock.getpeercert(binary_form=True))
        party = peer.spec.party
        if party == identity.party:
            raise PeerError("PartyMismatch", f"the peer claims our own party name {party}")
        if on_verified is not None:
            on_verified(cert)
        try:
            conn.request(
                "POST",
                url.path.rstrip("/") + path,
                body=body,
                headers={"Content-Type": "application/json"},
            )
            response = conn.getresponse()
            data = response.read(max_bytes + 1)
        except (OSError, ssl.SSLError, http.client.HTTPException) as exc:
            raise _classify(exc, connected=True) from None
        if response.status == 403:
            raise PeerError("Rejected", f"the peer does not know us: {data[:200]!r}")
        if response.status != 200 or len(data) > max_bytes:
            raise PeerError("BadResponse", f"HTTP {response.status} from the peer")
        return Exchange(party=party, certificate=cert, body=data)
    finally:
        conn.close()
