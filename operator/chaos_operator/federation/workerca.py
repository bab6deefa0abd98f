"""A party's worker CA: it issues every member a certificate that names its party and id.

Worker links (`chaos_worker.net.tls`) trust this CA and nothing else. A member's certificate
carries the URI SAN `chaos://<party>/<member id>` (`chaos_worker.config.member_uri`; its
common name is the member id, its organization the party, both for people reading it) and
serves as TLS server and client certificate alike; the member's replicator uses the same
one.

`WorkerAuthority` is the CA in memory (PEM in, PEM out): the operator keeps it in a Secret
and issues each worker pod's certificate into another (`chaos_operator.identities`).
`WorkerCA` keeps one in a directory: `chaos run` makes one per run in its private directory.
Files: `ca.crt`, `ca.key` and `<member>.crt`, `<member>.key`, keys mode 0600.

Federation: the worker CAs of the other parties arrive over the federation sync (`peer_ca`
checks each). A federating party's CA (`path_length=1`) cross-certifies each one
(`cross_certify`): the other CA's name and public key, signed by ours, with a critical
NameConstraints extension that permits URIs of that party's host only (RFC 5280 URI
constraints apply to the host: `chaos://<party>/...`) and no CA below it. The pods' trust
bundle (`bundle`) is our CA, the only trust anchor, and those cross certificates: a
certificate of party B's CA then verifies only when it names `chaos://B/...`.

A CA that signs leaves only (`path_length=0`: `chaos run`'s, a non-federating operator's
per namespace) is bound to its own party the same way, by a critical NameConstraints
extension of its own: a certificate it signs for `chaos://<other party>/...` fails the
handshake, so even its leaked key mints no member of another party that a verifier
accepts. A federating CA cannot be bound so: OpenSSL applies a trust anchor's constraints
to every chain below it, and the other parties' members are below it, through the cross
certificates. CAs made before carry no constraint and are used as they are.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from chaos_worker.config import Admission, TlsFiles, key_sha256, member_uri
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from chaos_operator.federation.identity import (
    CA_CERT,
    CA_KEY,
    IdentityError,
    issue,
    key_usage,
    parse_certificate,
    private_pem,
    self_signed_ca,
    spki_fingerprint,
    write_file,
)

LEEWAY = dt.timedelta(minutes=5)
"""How far back a certificate's validity starts (clocks of the hosts may differ a little)."""


@dataclass(frozen=True)
class IssuedCert:
    """A member's new certificate and key (PEM), the end of its validity, and its admission
    to a job (JSON, `chaos_worker.config.Admission`, bound to that key) when one was asked
    for."""

    cert: bytes
    key: bytes
    not_after: dt.datetime
    admission: bytes | None = None

    def __repr__(self) -> str:  # never the key, not even in a traceback
        return f"IssuedCert(not_after={self.not_after.isoformat()})"


class WorkerAuthority:
    """The worker CA of `party` in memory: its key and self-signed certificate."""

    def __init__(self, party: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        member_uri(party, "x")  # ValueError now, not at the first certificate
        self.party = party
        self._key = key
        self.certificate = cert
        self._cross: dict[tuple[str, str], x509.Certificate] = {}
        """(party, fingerprint of its CA's key) -> our cross certificate of that CA."""

    def __repr__(self) -> str:
        return f"WorkerAuthority(party={self.party!r}, not_after={self.not_after.isoformat()})"

    @classmethod
    def create(
        cls, party: str, *, days: float, now: dt.datetime | None = None, path_length: int = 0
    ) -> WorkerAuthority:
        """A new CA valid for `days` from `now` (default: the current time), less `LEEWAY`;
        `path_length` 1 lets it cross-certify other parties' CAs (federation), 0 binds it
        to its own party (see the module docstring)."""
        start = (now or dt.datetime.now(dt.UTC)) - LEEWAY
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, party),
                x509.NameAttribute(NameOID.COMMON_NAME, f"{party} chaos worker CA"),
            ]
        )
        end = start + LEEWAY + dt.timedelta(days=days)
        bound = party_constraint(party) if path_length == 0 else None
        key, cert = self_signed_ca(name, start, end, path_length, bound)
        return cls(party, key, cert)

    @classmethod
    def from_pem(cls, cert_pem: bytes, key_pem: bytes) -> WorkerAuthority:
        """The CA that `create` made, as `cert_pem` and `key_pem` hold it (IdentityError if
        they are no such CA)."""
        cert = parse_certificate(cert_pem)
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as exc:  # the parser's message holds no key material
            raise IdentityError(f"cannot read the worker CA's key: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
            raise IdentityError("the worker CA's key does not belong to its certificate")
        names = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        try:
            return cls(str(names[0].value) if names else "", key, cert)
        except ValueError:
            raise IdentityError("the worker CA's organization is not a party name") from None

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return private_pem(self._key)

    @property
    def not_after(self) -> dt.datetime:
        return self.certificate.not_valid_after_utc

    @property
    def cross_certifies(self) -> bool:
        """Whether this CA may certify other CAs below it (made for federation)."""
        limit = self.certificate.extensions.get_extension_for_class(x509.BasicConstraints)
        return limit.value.path_length is None or limit.value.path_length >= 1

    def cross_certify(self, party: str, ca: x509.Certificate) -> x509.Certificate:
        """Party `party`'s worker CA `ca` certified by this one: may name `chaos://<party>/...`
        only, and no CA below it; valid while both CAs are (cached per party and key)."""
        key = (party, spki_fingerprint(ca))
        if key in self._cross:
            return self._cross[key]
        member_uri(party, "x")  # ValueError: no party name
        cert = (
            x509.CertificateBuilder()
            .subject_name(ca.subject)
            .issuer_name(self.certificate.subject)
            .public_key(ca.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(max(ca.not_valid_before_utc, self.certificate.not_valid_before_utc))
            .not_valid_after(min(ca.not_valid_after_utc, self.not_after))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(key_usage(ca=True), critical=True)
            .add_extension(party_constraint(party), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), False
            )
            .sign(self._key, hashes.SHA256())
        )
        self._cross[key] = cert
        return cert

    def bundle(self, peers: Mapping[str, x509.Certificate]) -> bytes:
        """The pods' `ca.crt`: this CA, then each peer party's CA cross-certified (by party)."""
        pem = serialization.Encoding.PEM
        crosses = (self.cross_certify(p, peers[p]).public_bytes(pem) for p in sorted(peers))
        return self.cert_pem + b"".join(crosses)

    def admit(
        self, job: str, member: str, not_before: dt.datetime, not_after: dt.datetime, *, key: str
    ) -> Admission:
        """This party's signed word that `member`, holding the key `key` (`key_sha256` of its
        certificate), may join `job` within those dates (ValueError: a name or key that is
        not valid)."""
        return Admission(
            job=job,
            party=self.party,
            member=member,
            key_sha256=key,
            not_before=int(not_before.timestamp()),
            not_after=int(not_after.timestamp()),
        ).sign(self._key)

    def issue(
        self,
        member: str,
        *,
        days: float = 30,
        not_before: dt.datetime | None = None,
        job: str | None = None,
    ) -> IssuedCert:
        """A certificate for `member`, valid for `days` from `not_before` (default: now, less
        `LEEWAY`), but never past the CA's own end; with `job`, also its admission to that
        job, for the certificate's key and valid as long as the certificate."""
        start = not_before or dt.datetime.now(dt.UTC) - LEEWAY
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.party),
                x509.NameAttribute(NameOID.COMMON_NAME, member),
            ]
        )
        san = [x509.UniformResourceIdentifier(member_uri(self.party, member))]
        end = min(start + dt.timedelta(days=days), self.not_after)
        key, cert = issue(self._key, self.certificate.subject, subject, san, start, end)
        pem = cert.public_bytes(serialization.Encoding.PEM)
        end = cert.not_valid_after_utc
        admission = None
        if job is not None:
            admitted = self.admit(job, member, start, end, key=key_sha256(cert))
            admission = admitted.model_dump_json().encode()
        return IssuedCert(pem, private_pem(key), end, admission)


def party_constraint(party: str) -> x509.NameConstraints:
    """Certificates below may name members of `party` only (URI host `party`)."""
    return x509.NameConstraints([x509.UniformResourceIdentifier(party)], None)


Trust = frozenset[tuple[str, x509.NameConstraints | None]]


def trust_of(bundle: bytes) -> Trust:
    """What a trust bundle means: each CA's key and the names it is bound to (so bundles that
    differ only in serials, signatures or order mean the same); empty if unreadable."""
    try:
        certs = x509.load_pem_x509_certificates(bundle)
    except ValueError:
        return frozenset()
    trust = set()
    for cert in certs:
        try:
            bound = cert.extensions.get_extension_for_class(x509.NameConstraints).value
        except x509.ExtensionNotFound:
            bound = None
        trust.add((spki_fingerprint(cert), bound))
    return frozenset(trust)


def peer_ca(pem: str | bytes, now: dt.datetime) -> x509.Certificate:
    """Another party's worker CA as its operator sent it, checked (IdentityError: not one
    certificate, not a CA that may sign certificates, or outside its dates at `now`)."""
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise IdentityError(f"not a certificate: {exc}") from None
    if len(certs) != 1:
        raise IdentityError(f"{len(certs)} certificates, not one")
    cert = certs[0]
    try:
        limit = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except (x509.ExtensionNotFound, ValueError):
        raise IdentityError("not a CA (no basic constraints or key usage)") from None
    if not limit.ca or not usage.key_cert_sign:
        raise IdentityError("not a CA (basic constraints or key usage say so)")
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise IdentityError(
            f"outside its validity ({cert.not_valid_before_utc.isoformat()} to "
            f"{cert.not_valid_after_utc.isoformat()})"
        )
    return cert


class WorkerCA:
    """A new CA for the workers of `party`, kept in `directory` (see the module docstring)."""

    def __init__(
        self, directory: Path, party: str, *, days: int = 30, job: str | None = None
    ) -> None:
        """`job`: each member issued also gets its admission to that job."""
        self.authority = WorkerAuthority.create(party, days=days)
        self.job = job
        self.directory = directory
        self.party = party
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.ca_file = directory / CA_CERT
        write_file(self.ca_file, self.authority.cert_pem, 0o644)
        write_file(directory / CA_KEY, self.authority.key_pem, 0o600)

    def issue(
        self, member: str, *, days: float = 30, not_before: dt.datetime | None = None
    ) -> TlsFiles:
        """Write `<member>.crt`, `<member>.key` and, for a CA of a job, `<member>.admission`
        (see `WorkerAuthority.issue`); the paths as a worker's `tls`."""
        issued = self.authority.issue(member, days=days, not_before=not_before, job=self.job)
        cert_file, key_file = self.directory / f"{member}.crt", self.directory / f"{member}.key"
        write_file(cert_file, issued.cert, 0o644)
        write_file(key_file, issued.key, 0o600)
        files = TlsFiles(cert=str(cert_file), key=str(key_file), ca=str(self.ca_file))
        if issued.admission is None:
            return files
        admission_file = self.directory / f"{member}.admission"
        write_file(admission_file, issued.admission, 0o644)
        return files.model_copy(update={"admission": str(admission_file)})
