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
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from chaos_worker.config import TlsFiles, member_uri
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from chaos_operator.federation.identity import (
    CA_CERT,
    CA_KEY,
    IdentityError,
    issue,
    parse_certificate,
    private_pem,
    self_signed_ca,
    write_file,
)

LEEWAY = dt.timedelta(minutes=5)
"""How far back a certificate's validity starts (clocks of the hosts may differ a little)."""


@dataclass(frozen=True)
class IssuedCert:
    """A member's new certificate and key (PEM) and the end of its validity."""

    cert: bytes
    key: bytes
    not_after: dt.datetime

    def __repr__(self) -> str:  # never the key, not even in a traceback
        return f"IssuedCert(not_after={self.not_after.isoformat()})"


class WorkerAuthority:
    """The worker CA of `party` in memory: its key and self-signed certificate."""

    def __init__(self, party: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        member_uri(party, "x")  # ValueError now, not at the first certificate
        self.party = party
        self._key = key
        self.certificate = cert

    def __repr__(self) -> str:
        return f"WorkerAuthority(party={self.party!r}, not_after={self.not_after.isoformat()})"

    @classmethod
    def create(cls, party: str, *, days: float, now: dt.datetime | None = None) -> WorkerAuthority:
        """A new CA valid for `days` from `now` (default: the current time), less `LEEWAY`."""
        start = (now or dt.datetime.now(dt.UTC)) - LEEWAY
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, party),
                x509.NameAttribute(NameOID.COMMON_NAME, f"{party} chaos worker CA"),
            ]
        )
        key, cert = self_signed_ca(name, start, start + LEEWAY + dt.timedelta(days=days))
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

    def issue(
        self, member: str, *, days: float = 30, not_before: dt.datetime | None = None
    ) -> IssuedCert:
        """A certificate for `member`, valid for `days` from `not_before` (default: now, less
        `LEEWAY`), but never past the CA's own end."""
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
        return IssuedCert(pem, private_pem(key), cert.not_valid_after_utc)


class WorkerCA:
    """A new CA for the workers of `party`, kept in `directory` (see the module docstring)."""

    def __init__(self, directory: Path, party: str, *, days: int = 30) -> None:
        self.authority = WorkerAuthority.create(party, days=days)
        self.directory = directory
        self.party = party
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.ca_file = directory / CA_CERT
        write_file(self.ca_file, self.authority.cert_pem, 0o644)
        write_file(directory / CA_KEY, self.authority.key_pem, 0o600)

    def issue(
        self, member: str, *, days: float = 30, not_before: dt.datetime | None = None
    ) -> TlsFiles:
        """Write `<member>.crt` and `<member>.key` (see `WorkerAuthority.issue`); the paths
        as a worker's `tls`."""
        issued = self.authority.issue(member, days=days, not_before=not_before)
        cert_file, key_file = self.directory / f"{member}.crt", self.directory / f"{member}.key"
        write_file(cert_file, issued.cert, 0o644)
        write_file(key_file, issued.key, 0o600)
        return TlsFiles(cert=str(cert_file), key=str(key_file), ca=str(self.ca_file))
