"""Signed membership messages: a member speaks only for itself, a decision only comes from
whoever may make it.

A link's peer is authenticated by mutual TLS (`net.tls`), but flooded messages (`SIGNED`)
are forwarded hop by hop and name their `origin` themselves. With TLS, the origin seals
each one it makes (`Signer`): an ECDSA signature, by its TLS key, of the message's JSON
without the seal, and its certificate, so that any member can check it without having met
the origin. Forwarders pass the message on unchanged. Every receiver checks it (`Gate`)
before acting on it or forwarding it: the certificate chains to the run's CA bundle and
names the origin, the signature holds, and the origin may say what it says
(`membership.rules`: a leave, link change, join or reset only for itself; a decision from
the root, or for a recovery a member, of the view it replaces; a join plan from a member).
What fails is refused as `forged` (`net.bounds.Rejections`), never forwarded, and its
sender (who may only have relayed it) is not punished. Without TLS nothing is sealed or
checked. Gradient chunks are not sealed: they go point to point, on authenticated links.

The same seal vouches for the digests a newcomer checks a state against (`VOUCHED`): a
copy join's `StateTransfer`, the `StateWitness` a second member sends beside it, and a
snapshot's `SnapshotManifest` are sealed by their `sender`, the member whose state they
describe (its replicator holds its key), so that
no byte is used unless the digest it matches is that member's word (`join/state.py`,
`replication/puller.py`).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from chaos_worker.config import SIGNATURE, TlsFiles
from chaos_worker.membership.rules import speaks_for_another, undue_decision, undue_plan
from chaos_worker.membership.view import View
from chaos_worker.net.bounds import Reject
from chaos_worker.net.tls import Stamp, TlsError, identity_of, stamp, within
from chaos_worker.net.wire import (
    Decision,
    Heartbeat,
    JoinPlan,
    MemberStatus,
    Message,
    Proposal,
    Seal,
    SnapshotManifest,
    StateTransfer,
    StateWitness,
    WireMessage,
)

log = logging.getLogger(__name__)

Signed = Heartbeat | Proposal | MemberStatus | Decision | JoinPlan
SIGNED = (Heartbeat, Proposal, MemberStatus, Decision, JoinPlan)
"""The messages that name their origin and are flooded: sealed by it."""
Vouched = StateTransfer | StateWitness | SnapshotManifest
VOUCHED = (StateTransfer, StateWitness, SnapshotManifest)
"""Point-to-point messages that carry a snapshot's digests: sealed by their `sender`."""
Sealed = Signed | Vouched
MAX_CERTS = 4096
"""Verified certificates cached (past it the cache starts afresh)."""
MAX_VERIFIED = 4096
"""Seals verified lately whose copies are not checked again (oldest forgotten first)."""


def canonical(message: Sealed) -> bytes:
    """The bytes a seal signs: the message's JSON without its seal (deterministic for a
    given model, so a receiver computes the same bytes from what it parsed)."""
    return message.model_dump_json(exclude={"seal"}).encode()


def signer_of(message: Sealed) -> str:
    """Whose seal `message` must carry: a flooded message's origin, else its sender."""
    return message.origin if isinstance(message, SIGNED) else message.sender


def _sealable(message: WireMessage) -> bool:
    return isinstance(message, SIGNED + VOUCHED) and message.seal is None


class Signer:
    """Seals the flooded messages this member makes, and the state and manifests it vouches
    for, with its TLS key (reloaded, as the links' contexts are, when the files are
    renewed)."""

    def __init__(self, files: TlsFiles, me: str) -> None:
        self.me = me
        self._files = files
        self._stamp = stamp(files.cert, files.key)
        self._key, self._cert = self._load()

    def _load(self) -> tuple[ec.EllipticCurvePrivateKey, str]:
        files = self._files
        try:
            key = serialization.load_pem_private_key(Path(files.key).read_bytes(), None)
            cert = x509.load_pem_x509_certificate(Path(files.cert).read_bytes())
        except (OSError, ValueError, TypeError) as exc:
            raise TlsError(f"cannot load {files.key} or {files.cert} to sign: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise TlsError(f"{files.key} is not an ECDSA key")
        if cert.public_key() != key.public_key():
            raise TlsError(f"{files.key} is not the key of {files.cert}")
        identity = identity_of(cert)
        if identity is None or identity.member != self.me:
            raise TlsError(f"{files.cert} does not name member {self.me!r}")
        return key, base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()

    def _refresh(self) -> None:
        now = stamp(self._files.cert, self._files.key)
        if now is None or now == self._stamp:
            return
        self._stamp = now
        try:
            self._key, self._cert = self._load()
        except TlsError as exc:  # half renewed: the pair loaded before stays
            log.warning("signing with the key loaded before: %s", exc)

    def seal(self, message: WireMessage) -> WireMessage:
        """`message` sealed if it is of a sealed kind (`SIGNED`, `VOUCHED`), this member is
        its signer and it is not sealed yet; any other message as it is (a forwarded one
        stays byte for byte the origin's)."""
        if not _sealable(message) or signer_of(message) != self.me:
            return message
        self._refresh()
        signature = self._key.sign(canonical(message), SIGNATURE)
        seal = Seal(cert=self._cert, sig=base64.b64encode(signature).decode())
        return message.model_copy(update={"seal": seal})


class Verifier:
    """Checks seals against the run's CA bundle (reloaded when it changes). Certificates
    verified once are cached, and so are the seals verified lately: the copies of a
    flooded message that arrive over other links cost no second signature check."""

    def __init__(self, ca_file: str) -> None:
        self._ca_file = ca_file
        self._stamp: Stamp | None = None
        self._cas: list[x509.Certificate] = []
        self._known: dict[str, tuple[str, ec.EllipticCurvePublicKey, dt.datetime]] = {}
        self._verified: dict[bytes, None] = {}
        self._refresh()
        if not self._cas:
            raise TlsError(f"cannot load the CA bundle {ca_file}")

    def _refresh(self) -> None:
        now = stamp(self._ca_file)
        if now is None or now == self._stamp:
            return
        self._stamp = now
        try:
            self._cas = x509.load_pem_x509_certificates(Path(self._ca_file).read_bytes())
        except (OSError, ValueError) as exc:
            log.warning("keeping the CA bundle loaded before: %s", exc)
            return
        self._known.clear()  # trust changed: every certificate is verified again

    def bundle(self) -> list[x509.Certificate]:
        """The CAs of the bundle as loaded last (reloaded first if the file changed)."""
        self._refresh()
        return self._cas

    def check(self, message: Sealed) -> str | None:
        """Why `message`'s seal is not its signer's (`signer_of`; None: it is)."""
        seal = message.seal
        if seal is None:
            return "unsigned"
        self._refresh()
        known = self._known.get(seal.cert) or self._learn(seal.cert)
        if isinstance(known, str):
            return known
        member, key, not_after = known
        signer = signer_of(message)
        if member != signer:
            return f"signed by {member}, not by {signer}"
        if dt.datetime.now(dt.UTC) > not_after:
            return f"the certificate of {member} expired"
        data = canonical(message)
        digest = hashlib.sha256(data + seal.sig.encode()).digest()
        if digest in self._verified:
            return None
        try:
            key.verify(base64.b64decode(seal.sig), data, SIGNATURE)
        except (InvalidSignature, ValueError):
            return f"the signature is not {member}'s"
        if len(self._verified) >= MAX_VERIFIED:
            del self._verified[next(iter(self._verified))]  # the oldest
        self._verified[digest] = None
        return None

    def _learn(self, text: str) -> tuple[str, ec.EllipticCurvePublicKey, dt.datetime] | str:
        """The member, key and expiry of a certificate issued by a CA of the bundle (and
        valid now), cached; else why not."""
        try:
            cert = x509.load_der_x509_certificate(base64.b64decode(text))
        except ValueError:
            return "an unreadable certificate"
        now = dt.datetime.now(dt.UTC)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            return "a certificate outside its validity"
        ca = next((ca for ca in self._cas if self._issued(cert, ca)), None)
        if ca is None:
            return "a certificate of no CA of the bundle"
        if not ca.not_valid_before_utc <= now <= ca.not_valid_after_utc:
            return "a certificate of a CA outside its validity"
        key = cert.public_key()
        identity = identity_of(cert)
        if identity is None or not isinstance(key, ec.EllipticCurvePublicKey):
            return "a certificate that names no member"
        if not within(ca, identity):
            return f"a certificate its CA may not issue ({identity.party}/{identity.member})"
        if len(self._known) >= MAX_CERTS:
            self._known.clear()
        self._known[text] = entry = (identity.member, key, cert.not_valid_after_utc)
        return entry

    @staticmethod
    def _issued(cert: x509.Certificate, ca: x509.Certificate) -> bool:
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True


class Gate:
    """What a member lets in of the flooded messages: sealed by their origin, and said by
    whoever may say it (`known()`: the views this member knows, for the decision rules)."""

    def __init__(self, verifier: Verifier, reject: Reject, known: Callable[[], list[View]]) -> None:
        self._verifier = verifier
        self._reject = reject
        self._known = known

    def admit(self, sender: str, message: Message) -> bool:
        """Whether `message` from the link to `sender` may be acted on and forwarded; a
        refused one is counted as `forged` (whoever forged it, not `sender`, is named)."""
        if not isinstance(message, SIGNED):
            return True
        why = self._verifier.check(message) or self._authority(message)
        if why is None:
            return True
        self._reject(sender, "forged", f"{message.type} said to be from {message.origin}: {why}")
        return False

    def _authority(self, message: Signed) -> str | None:
        if isinstance(message, Proposal):
            return speaks_for_another(message)
        if isinstance(message, Decision):
            return undue_decision(message, self._known())
        if isinstance(message, JoinPlan):
            return undue_plan(message, self._known())
        return None
