"""Mutual TLS on worker links: the contexts, and the member a peer's certificate names.

Every link of a worker with `WorkerConfig.tls` (member to member, newcomer to replicator,
probes, `reachable`) is TLS 1.3 with certificates required both ways and verified against
the run's CA bundle (chain and validity dates; an expired certificate fails the handshake).
Member ids are not DNS names, so no host name is checked: a certificate names its holder by
the URI SAN `chaos://<party>/<member id>` (`chaos_worker.config.member_uri`), and the
transport compares that id with the peer it expects itself (`peer_of`), after the handshake.

Several parties (a federated job): the bundle holds our own CA, the only trust anchor, and
for each other party its worker CA cross-certified by ours with a NameConstraints extension
that permits URIs of that party's host only, so OpenSSL refuses a chain from party B's CA
whose certificate names `chaos://A/...`. On top of that, a member of another party must be
named in its own party's name (`<party>.<pod>`, `qualified`): B cannot pose as A's member
`A.w0` with `chaos://B/A.w0`.

Renewed files (a pod's Secret that the operator re-issued and the kubelet swapped in) are
taken up by the next connection either way: `LinkTls.client` and the listener's handshakes
(through its `sni_callback`) first `refresh`, which reloads the files when they changed.
Links already open keep the certificate they were made with.

Every handshake this worker refuses, on any of its links, is counted by reason
(`HANDSHAKE_REASONS`, `LinkTls.refusals`: `chaos_refused_handshakes_total{reason}`) and
logged once per peer and reason; one the peer refused (an alert it sent) is the peer's to
count.
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from chaos_worker.config import MEMBER_URI, TlsFiles
from chaos_worker.net.bounds import Rejections

ANY_MEMBER_PREFIX = "_"
"""A peer name starting with this names a link, not a member (the newcomer's `_seed`): the
server at the other end need only hold a certificate of the run's CA."""

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 10.0
"""How long a listener waits for a client's handshake before it drops the connection."""

HANDSHAKE_REASONS = ("unknown_ca", "expired", "bad_name", "no_certificate", "other")
"""Why this worker refused a handshake: a certificate of no CA it trusts; one outside its
validity dates (or its CA's); one that names nobody, a member it may not name (a name
constraint, `qualified`) or another member than the link is for; none at all; anything else
(a client that speaks no TLS 1.3, a certificate OpenSSL finds faulty otherwise)."""

_VERIFY_REASONS = {
    **dict.fromkeys((2, 7, 18, 19, 20, 21), "unknown_ca"),
    **dict.fromkeys((9, 10), "expired"),
    **dict.fromkeys((47, 48, 49, 51, 52, 53), "bad_name"),
}
"""OpenSSL's verification codes (`X509_V_ERR_*`, stable across versions) by reason: no
issuer found or trusted (2, 20, 21), a self-signed certificate (18, 19) or a signature of
another key (7); not yet or no longer valid (9, 10); a name outside a CA's constraints."""


def refusal(error: BaseException) -> str | None:
    """Why a failed handshake was this worker's refusal (`HANDSHAKE_REASONS`); None if it
    was not: the peer went away, or refused this worker's certificate (its alert)."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return _VERIFY_REASONS.get(error.verify_code, "other")
    if not isinstance(error, ssl.SSLError):
        return None
    if isinstance(error, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return None
    reason = getattr(error, "reason", None) or ""  # none on one raised in Python
    if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return "no_certificate"
    return None if "ALERT" in reason else "other"


class TlsError(ValueError):
    """TLS files that cannot be used (the message says why; it never holds key material)."""


@dataclass(frozen=True)
class PeerIdentity:
    """Who a verified certificate names."""

    party: str
    member: str


def identity_of(cert: x509.Certificate | bytes | None) -> PeerIdentity | None:
    """The identity in a certificate (parsed or DER): its one `chaos://` URI SAN (None if
    it has none, several, or cannot be read)."""
    if not cert:
        return None
    try:
        if isinstance(cert, bytes):
            cert = x509.load_der_x509_certificate(cert)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except (ValueError, x509.ExtensionNotFound):
        return None
    found = [
        match
        for uri in sans.value.get_values_for_type(x509.UniformResourceIdentifier)
        if (match := MEMBER_URI.fullmatch(uri))
    ]
    if len(found) != 1:
        return None
    return PeerIdentity(found[0]["party"], found[0]["member"])


def qualified(identity: PeerIdentity, own_party: str) -> bool:
    """Whether a peer may be the member it names: one of our own party, or one of another
    party whose member id is in that party's name (`<party>.<...>`)."""
    return identity.party == own_party or identity.member.startswith(identity.party + ".")


def bound_parties(ca: x509.Certificate) -> frozenset[str] | None:
    """The parties a CA of the bundle may name: the hosts of the URI subtrees its
    NameConstraints permit (a cross-certified CA of another party, or our own CA bound to
    our party); None: unbound (our own CA, federating or made before CAs were bound). A CA
    with constraints but no permitted URI may name no party."""
    try:
        constraints = ca.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return None
    permitted = constraints.permitted_subtrees or ()
    return frozenset(
        str(name.value).lower()
        for name in permitted
        if isinstance(name, x509.UniformResourceIdentifier)
    )


def within(ca: x509.Certificate, identity: PeerIdentity) -> bool:
    """Whether a certificate `ca` issued may name `identity` (`bound_parties`, `qualified`):
    what OpenSSL checks of a TLS chain, for certificates checked outside one (seals). A
    self-signed CA is a party's own: any member of its party; a cross-certified one only
    members named in their party's name."""
    parties = bound_parties(ca)
    if parties is None:
        return True
    if identity.party not in parties:
        return False
    return ca.issuer == ca.subject or identity.member.startswith(identity.party + ".")


def _context(files: TlsFiles, *, server: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # member ids are no host names: `peer_of` checks the id
    ctx.verify_mode = ssl.CERT_REQUIRED
    if server:  # no resumption: a sealed link's client reads nothing after its handshake
        ctx.num_tickets = 0
    try:
        ctx.load_cert_chain(files.cert, files.key)
        ctx.load_verify_locations(cafile=files.ca)
    except (OSError, ssl.SSLError) as exc:
        # the messages name files and reasons, never the keys' contents
        raise TlsError(f"cannot load the TLS files ({files.cert}, {files.ca}): {exc}") from None
    return ctx


Stamp = tuple[tuple[int, int, int], ...]


def stamp(*paths: str) -> Stamp | None:
    """What tells a changed file (inode, size, mtime of each, links followed); None if one
    cannot be read."""
    try:
        stats = [os.stat(path) for path in paths]
    except OSError:
        return None
    return tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)


class LinkTls:
    """The server and client contexts of one worker, whose certificate names `me`; renewed
    files are taken up by new connections (see the module docstring)."""

    def __init__(
        self, files: TlsFiles, me: str, *, count: Callable[[str], None] | None = None
    ) -> None:
        """`count(reason)` for every handshake refused (the worker's Prometheus counter)."""
        self._files = files
        self._me = me
        self.refusals = Rejections(count, reasons=HANDSHAKE_REASONS, what="a TLS handshake")
        """Handshakes refused, by reason; each peer and reason is logged once."""
        self._stamp = self._refused = stamp(files.cert, files.key, files.ca)
        self.me, self._client, self._server = self._load()
        self.server = self._server
        """The listener's context; each handshake gets the one loaded last."""
        self.server.sni_callback = self._handshake

    def _load(self) -> tuple[PeerIdentity, ssl.SSLContext, ssl.SSLContext]:
        files = self._files
        try:
            own = identity_of(x509.load_pem_x509_certificate(Path(files.cert).read_bytes()))
        except (OSError, ValueError) as exc:
            raise TlsError(f"cannot read the certificate {files.cert}: {exc}") from None
        if own is None or own.member != self._me:
            raise TlsError(
                f"{files.cert} does not name member {self._me!r} (chaos://PARTY/{self._me})"
            )
        return own, _context(files, server=False), _context(files, server=True)

    @property
    def client(self) -> ssl.SSLContext:
        """The context of a new outgoing connection."""
        self.refresh()
        return self._client

    def refresh(self) -> bool:
        """Load the files again if they changed since; False if they did not, or cannot be
        used (the contexts loaded before stay until the files change again)."""
        files = self._files
        now = stamp(files.cert, files.key, files.ca)
        if now is None or now in (self._stamp, self._refused):
            return False
        try:
            self.me, self._client, self._server = self._load()
        except TlsError as exc:  # e.g. files that name another member
            self._refused = now
            log.warning("keeping the certificate loaded before: %s", exc)
            return False
        self._stamp = now
        log.info("loaded the renewed certificate %s", self._files.cert)
        return True

    def peer(self, ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> PeerIdentity | None:
        """The identity of the peer of a completed handshake (`peer_of`), or None if it is a
        member of another party that is not named in its party's name (`qualified`)."""
        identity = peer_of(ssl_object)
        if identity is None or not qualified(identity, self.me.party):
            return None
        return identity

    def failed(self, peer: str, error: BaseException) -> bool:
        """A handshake with `peer` raised `error`: counted if it was this worker's refusal
        (`refusal`); whether it was."""
        reason = refusal(error)
        if reason is not None:
            self.refusals(peer, reason, str(error))
        return reason is not None

    def _handshake(
        self, ssl_object: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext
    ) -> None:
        """The listener's `sni_callback` (called for every handshake, with or without SNI)."""
        self.refresh()
        if ssl_object.context is not self._server:
            ssl_object.context = self._server


def peer_of(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> PeerIdentity | None:
    """The identity of the peer of a completed handshake (its chain already verified)."""
    if ssl_object is None:
        return None
    return identity_of(ssl_object.getpeercert(binary_form=True))


def names(peer: str, identity: PeerIdentity | None) -> bool:
    """Whether the server certificate `identity` may serve the link to `peer`."""
    if identity is None:
        return False
    return peer.startswith(ANY_MEMBER_PREFIX) or identity.member == peer
