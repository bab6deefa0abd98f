"""Who may ask to join: a joiner whose party's worker CA admitted it to this job.

A certificate of a CA the job trusts says who a joiner is, not that its party's operator
decided to add it to this job. So with TLS every worker carries an `Admission`
(`chaos_worker.config`; `WorkerConfig.tls.admission`) signed by its party's worker CA (the
operator's for pods, the run's for `chaos run`): it names the job, the party, the member id,
the key of the certificate issued with it and a validity window. A worker's own admission
says which job it is in (`OwnAdmission`); a newcomer, or a paused member that rejoins,
carries it in its join proposals.

Every member checks a join proposal (`JoinerCheck`), after its seal (`net.signing.Gate`) and
before recording, flooding or planning it: the admission is signed by the CA this worker
trusts for its party (our own CA for our party; another party's CA as our bundle
cross-certifies it, bound to that party), names the party, member and key of the joiner's
certificate (the seal's, whoever relayed the proposal), and this worker's job, and is valid
now. The key binding stops a valid admission (not secret: every member floods and records
it) from serving another certificate of that name, an older pod's whose key leaked say. A
proposal that fails changes nothing: it is counted as `unadmitted` in
`chaos_rejected_messages_total` and logged once per joiner, and the member that forwarded it
is not blamed.

A config of before admissions (`tls` without `admission`) checks no joiner; without TLS
there are no identities, so no admissions either.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import logging
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from chaos_worker.config import Admission, TlsFiles, key_sha256, read_admission
from chaos_worker.net.bounds import Reject
from chaos_worker.net.signing import Verifier
from chaos_worker.net.tls import PeerIdentity, Stamp, TlsError, bound_parties, identity_of, stamp
from chaos_worker.net.wire import Message, Proposal

log = logging.getLogger(__name__)

Wall = Callable[[], float]
"""Seconds since the epoch (admissions' windows are Unix seconds)."""


def party_key(
    cas: list[x509.Certificate], party: str, own_party: str, now: dt.datetime
) -> ec.EllipticCurvePublicKey | None:
    """The key of the worker CA this worker trusts for `party` (None: none, or not within its
    dates): a CA of the bundle bound to exactly that party (our own CA bound to our party, or
    another party's CA as our cross certificate binds it), or our own unbound CA (a
    federating party's) for our own party."""
    for ca in cas:
        if not ca.not_valid_before_utc <= now <= ca.not_valid_after_utc:
            continue
        parties = bound_parties(ca)
        own_anchor = parties is None and ca.issuer == ca.subject and party == own_party
        key = ca.public_key()
        if (own_anchor or parties == {party}) and isinstance(key, ec.EllipticCurvePublicKey):
            return key
    return None


def unadmitted(
    admission: Admission | None,
    joiner: PeerIdentity,
    key: str,
    job: str,
    own_party: str,
    cas: list[x509.Certificate],
    now: float,
    *,
    window: bool = True,
) -> str | None:
    """Why `admission` does not let `joiner`, as its certificate names it and holding the key
    `key` (`key_sha256` of that certificate), into `job` at `now` (None: it does); `window`
    False: whatever its validity window says."""
    if admission is None:
        return "no admission"
    if admission.member != joiner.member or admission.party != joiner.party:
        return f"an admission of {admission.party}/{admission.member}"
    if admission.key_sha256 != key:
        return (
            f"an admission for another key than its certificate's (key sha256 "
            f"{admission.key_sha256[:16]}…, the certificate's {key[:16]}…)"
        )
    if admission.job != job:
        return f"an admission to job {admission.job!r}, not {job!r}"
    if window and not admission.valid_at(now):
        return f"an admission valid from {admission.not_before} to {admission.not_after}"
    key = party_key(cas, admission.party, own_party, dt.datetime.fromtimestamp(now, dt.UTC))
    if key is None:
        return f"no CA trusted for party {admission.party}"
    if not admission.signed_by(key):
        return f"an admission not signed by the CA of party {admission.party}"
    return None


class OwnAdmission:
    """This worker's admission, read from `files.admission` and checked like a joiner's
    (but for its window: a worker whose admission ran out still trains, it only cannot
    join); renewed files are taken up when they change, unless they name another job or
    member (the admission read before stays)."""

    def __init__(self, files: TlsFiles, verifier: Verifier, *, wall: Wall = time.time) -> None:
        """TlsError, saying why, if the file is missing, is no admission, or does not admit
        this worker's certificate."""
        assert files.admission is not None
        self._path = files.admission
        self._cert = files.cert
        self._verifier = verifier
        self._wall = wall
        self._stamp: Stamp | None = stamp(self._path, self._cert)
        self.admission = self._load(None)
        self.job = self.admission.job
        """The job this worker is in: the one a joiner's admission must name."""
        self.party = self.admission.party

    def _load(self, job: str | None) -> Admission:
        """The admission in the file, if it admits this worker (to `job`, once known)."""
        try:
            admission = read_admission(self._path)
            cert = x509.load_pem_x509_certificate(Path(self._cert).read_bytes())
        except (OSError, ValueError) as exc:
            raise TlsError(str(exc)) from None
        own = identity_of(cert)
        if own is None:
            raise TlsError(f"{self._cert} names no member")
        cas, key = self._verifier.bundle(), key_sha256(cert)
        job = job or admission.job
        why = unadmitted(admission, own, key, job, own.party, cas, self._wall(), window=False)
        if why is not None:
            raise TlsError(
                f"{self._path} does not admit {own.party}/{own.member} of {self._cert}: {why}"
            )
        if not admission.valid_at(self._wall()):
            log.warning("%s is not valid now: this worker cannot join", self._path)
        return admission

    def current(self) -> Admission:
        """The admission to carry in a join proposal (reloaded if it or the certificate
        changed: a renewal brings both, the new admission for the new key)."""
        now = stamp(self._path, self._cert)
        if now is not None and now != self._stamp:
            self._stamp = now
            try:
                self.admission = self._load(self.job)
            except TlsError as exc:
                log.warning("keeping the admission read before: %s", exc)
        return self.admission


class JoinerCheck:
    """Lets in the join proposals whose joiner is admitted to this worker's job (see the
    module docstring); the others are refused as `unadmitted`."""

    def __init__(
        self, own: OwnAdmission, verifier: Verifier, reject: Reject, *, wall: Wall = time.time
    ) -> None:
        self._own = own
        self._verifier = verifier
        self._reject = reject
        self._wall = wall

    def admit(self, message: Message) -> bool:
        """Whether `message` (its seal already checked) may be acted on and forwarded."""
        if not isinstance(message, Proposal) or message.kind != "join":
            return True
        why = self.why(message)
        if why is None:
            return True
        detail = f"the join of {message.subject} carries {why}"
        self._reject(message.subject, "unadmitted", detail)  # the joiner's, not the sender's
        return False

    def why(self, proposal: Proposal) -> str | None:
        """Why `proposal`'s joiner is not admitted here (None: it is)."""
        cert = _sealer(proposal)
        joiner = identity_of(cert)
        if cert is None or joiner is None or joiner.member != proposal.subject:
            return "no certificate naming the joiner"
        own, key = self._own, key_sha256(cert)
        cas = self._verifier.bundle()
        return unadmitted(proposal.admission, joiner, key, own.job, own.party, cas, self._wall())


def _sealer(proposal: Proposal) -> x509.Certificate | None:
    """The certificate of `proposal`'s seal (the gate verified it and the seal's signature by
    its key), not the relaying link's."""
    if proposal.seal is None:
        return None
    try:
        return x509.load_der_x509_certificate(base64.b64decode(proposal.seal.cert, validate=True))
    except (binascii.Error, ValueError):
        return None
