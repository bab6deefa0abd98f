"""A party's identity: its own CA and an operator certificate signed by it.

`chaos identity init --party NAME --out DIR` writes, in the layout of a Kubernetes TLS Secret
plus the CA: `ca.crt`, `tls.crt`, `tls.key` (0600), and the CA's key `ca.key` (0600, keep it
out of the cluster). The operator certificate serves both server and client authentication;
its common name is the party name. Other parties pin it in a `ChaosPeer` by `caBundle`
(`ca.crt`) or by `keyFingerprint` (`sha256:<hex>` of the DER SubjectPublicKeyInfo).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from chaos_worker.config import key_sha256
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from chaos_operator.api.chaosjob import NAME_PATTERN

CA_CERT, CA_KEY, TLS_CERT, TLS_KEY = "ca.crt", "ca.key", "tls.crt", "tls.key"
DEFAULT_SANS = ("localhost", "127.0.0.1")


class IdentityError(ValueError):
    """An identity that cannot be created or loaded (the message says why)."""


def spki_fingerprint(cert: x509.Certificate | bytes) -> str:
    """`sha256:<hex>` of a certificate's DER SubjectPublicKeyInfo (PEM/DER bytes or parsed)."""
    return "sha256:" + key_sha256(parse_certificate(cert) if isinstance(cert, bytes) else cert)


def parse_certificate(data: bytes) -> x509.Certificate:
    """One certificate from PEM or DER bytes."""
    try:
        if data.lstrip().startswith(b"-----"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise IdentityError(f"not a certificate: {exc}") from None


def party_of(cert: x509.Certificate) -> str | None:
    """The party a certificate names: its common name, if it is a valid party name."""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    name = str(names[0].value) if names else ""
    return name if re.fullmatch(NAME_PATTERN, name) and len(name) <= 63 else None


def _san(value: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        pass
    if not re.fullmatch(r"[A-Za-z0-9*]([-A-Za-z0-9.*]*[A-Za-z0-9])?", value):
        raise IdentityError(f"--san {value!r} is neither an IP address nor a DNS name")
    return x509.DNSName(value)


def key_usage(*, ca: bool) -> x509.KeyUsage:
    """Key usage of a signing CA (`ca`) or of a leaf that signs TLS handshakes."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


@dataclass(frozen=True)
class NewIdentity:
    """What `create` made: PEM texts and the operator key's fingerprint."""

    party: str
    ca_cert: bytes
    ca_key: bytes
    cert: bytes
    key: bytes
    fingerprint: str


def self_signed_ca(
    name: x509.Name,
    not_before: dt.datetime,
    not_after: dt.datetime,
    path_length: int = 0,
    constraints: x509.NameConstraints | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new P-256 key and a self-signed CA certificate `name` for it (signs leaves only,
    unless `path_length` lets it certify that many CAs below it; with `constraints`, a
    critical NameConstraints extension binds the names below it)."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    if constraints is not None:
        builder = builder.add_extension(constraints, critical=True)
    return key, builder.sign(key, hashes.SHA256())


def issue(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_name: x509.Name,
    subject: x509.Name,
    sans: list[x509.GeneralName],
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new P-256 key and a leaf certificate for it, signed by the CA (`ca_key`, `ca_name`),
    for TLS server and client authentication alike."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage(ca=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A private key as unencrypted PKCS#8 PEM (to be written with `write_file`, mode 0600)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Write `path` anew, created with its final `mode`: a key is never readable by others,
    not even briefly."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, mode)


def create(party: str, sans: tuple[str, ...] = DEFAULT_SANS, days: int = 365) -> NewIdentity:
    """A new party CA (valid 10 years) and an operator certificate (valid `days`) signed by it."""
    if not (re.fullmatch(NAME_PATTERN, party) and len(party) <= 63):
        raise IdentityError(f"--party {party!r} must be a DNS label (a-z, 0-9, -; at most 63)")
    if days < 1:
        raise IdentityError("--days must be at least 1")
    names = [_san(s) for s in sans]
    if not names:
        raise IdentityError("at least one --san is needed")
    now = dt.datetime.now(dt.UTC)
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, party),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{party} chaos CA"),
        ]
    )
    ca_key, ca = self_signed_ca(
        ca_name, now - dt.timedelta(minutes=5), now + dt.timedelta(days=3650)
    )
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, party),
            x509.NameAttribute(NameOID.COMMON_NAME, party),
        ]
    )
    key, cert = issue(
        ca_key,
        ca_name,
        subject,
        names,
        now - dt.timedelta(minutes=5),
        now + dt.timedelta(days=days),
    )
    pem = serialization.Encoding.PEM
    return NewIdentity(
        party=party,
        ca_cert=ca.public_bytes(pem),
        ca_key=private_pem(ca_key),
        cert=cert.public_bytes(pem),
        key=private_pem(key),
        fingerprint=spki_fingerprint(cert),
    )


def write(identity: NewIdentity, out: Path, *, force: bool = False) -> list[Path]:
    """Write the identity's files into `out` (keys 0600); refuses to overwrite unless `force`."""
    files = {
        CA_CERT: (identity.ca_cert, 0o644),
        CA_KEY: (identity.ca_key, 0o600),
        TLS_CERT: (identity.cert, 0o644),
        TLS_KEY: (identity.key, 0o600),
    }
    paths = [out / name for name in files]
    existing = [p.name for p in paths if p.exists()]
    if existing and not force:
        raise IdentityError(f"{out} already holds {', '.join(existing)} (use --force to replace)")
    out.mkdir(parents=True, exist_ok=True)
    for path, (data, mode) in zip(paths, files.values(), strict=True):
        write_file(path, data, mode)
    return paths


@dataclass(frozen=True)
class Identity:
    """A party's operator identity as loaded from a directory (`--identity DIR`)."""

    directory: Path
    party: str
    fingerprint: str
    cert_file: Path
    key_file: Path
    ca_cert: bytes

    @property
    def cert_pem(self) -> bytes:
        return self.cert_file.read_bytes()


def load(directory: Path) -> Identity:
    """Load and check `tls.crt`, `tls.key` and `ca.crt` from `directory`."""
    paths = {name: directory / name for name in (CA_CERT, TLS_CERT, TLS_KEY)}
    missing = [name for name, p in paths.items() if not p.is_file()]
    if missing:
        raise IdentityError(
            f"{directory}: missing {', '.join(missing)} (create them with `chaos identity init`)"
        )
    try:
        cert = parse_certificate(paths[TLS_CERT].read_bytes())
        key = serialization.load_pem_private_key(paths[TLS_KEY].read_bytes(), password=None)
        ca = paths[CA_CERT].read_bytes()
        parse_certificate(ca)
    except (OSError, ValueError, TypeError) as exc:
        # The message of a key parser never contains key material.
        raise IdentityError(f"{directory}: cannot read the identity: {exc}") from None
    if key_sha256(key.public_key()) != key_sha256(cert):
        raise IdentityError(f"{directory}: tls.key does not belong to tls.crt")
    party = party_of(cert)
    if party is None:
        raise IdentityError(f"{directory}: tls.crt's common name is not a party name")
    return Identity(
        directory=directory,
        party=party,
        fingerprint=spki_fingerprint(cert),
        cert_file=paths[TLS_CERT],
        key_file=paths[TLS_KEY],
        ca_cert=ca,
    )
