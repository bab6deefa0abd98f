"""The operator's admissions: each pod's `<pod>-tls` Secret carries the member's admission
to its job (`admission.json`), signed by the namespace's worker CA, bound to the key of the
Secret's certificate, valid as long as the certificate and renewed with it (a new key, a
new admission); a Secret without one (written before admissions, or before the key
binding), with one of another job or for another key is issued anew. What the operator
writes is what the worker checks (`chaos_worker.membership.joiners`), read back from the
files as the pod mounts them; the check refuses an admission for another key than the
joiner's certificate's, and so does a worker its own. Against the in-memory secrets API of
`test_worker_identities`, with real certificates."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from chaos_operator.federation.workerca import WorkerAuthority
from chaos_operator.identities import CA_SECRET, WorkerIdentities, renewal
from chaos_operator.pods import ADMISSION_KEY, TLS_FILES, Options, tls_secret
from chaos_worker.config import Admission, TlsFiles, key_sha256
from chaos_worker.membership.joiners import OwnAdmission, unadmitted
from chaos_worker.net.signing import Verifier
from chaos_worker.net.tls import PeerIdentity, TlsError, identity_of
from cryptography import x509

from tests.unit.test_reconcile import NOW, make_job
from tests.unit.test_worker_identities import (
    DAY,
    FakeSecrets,
    cert_of,
    issuer,
    live,
    planned_pods,
    v1_secret,
)

pytestmark = pytest.mark.unit


def admission_in(secrets: FakeSecrets, pod: str) -> Admission:
    return Admission.model_validate_json(secrets.data(f"{pod}-tls")[ADMISSION_KEY])


def mounted(secrets: FakeSecrets, pod: str, directory: Path) -> TlsFiles:
    """The pod's Secret as the kubelet mounts it: a file per entry, at `TLS_FILES`' names."""
    directory.mkdir()
    for key, value in secrets.data(f"{pod}-tls").items():
        (directory / key).write_bytes(value)
    return TlsFiles(**{
        field: str(directory / Path(path).name)
        for field, path in TLS_FILES.model_dump().items()
    })  # fmt: skip


def test_the_pod_secret_carries_its_admission_to_the_job_renewed_with_the_certificate(
    tmp_path: Path,
) -> None:
    secrets, job = FakeSecrets(), make_job(2)
    pods = [live(p, f"uid-{i}") for i, p in enumerate(planned_pods())]
    ids = issuer(secrets)
    assert ids.ensure(job, pods, NOW) == ["digits-w0", "digits-w1"]
    ca = cert_of(secrets.data(CA_SECRET)["tls.crt"])
    first = admission_in(secrets, "digits-w0")
    cert = cert_of(secrets.data("digits-w0-tls")["tls.crt"])
    assert (first.job, first.party, first.member) == ("digits", "ns", "digits-w0")
    assert first.not_before == int(cert.not_valid_before_utc.timestamp())
    assert first.not_after == int(cert.not_valid_after_utc.timestamp())
    assert first.signed_by(ca.public_key())  # type: ignore[arg-type]
    assert first.key_sha256 == key_sha256(cert)  # the key of the Secret's own certificate
    # what a pod's worker makes of its files: its job, and w1's admission is good to it
    w0 = mounted(secrets, "digits-w0", tmp_path / "w0")
    own = OwnAdmission(w0, Verifier(w0.ca), wall=NOW.timestamp)
    assert own.job == "digits"
    w1 = identity_of(cert_of(secrets.data("digits-w1-tls")["tls.crt"]))
    assert w1 is not None
    cas = x509.load_pem_x509_certificates(Path(w0.ca).read_bytes())
    w1_admission = admission_in(secrets, "digits-w1")
    w1_key = key_sha256(cert_of(secrets.data("digits-w1-tls")["tls.crt"]))
    assert unadmitted(w1_admission, w1, w1_key, own.job, "ns", cas, NOW.timestamp()) is None
    # not renewed before the certificate is; then with it, for the new certificate's window
    assert ids.ensure(job, pods, NOW + 19 * DAY) == []
    assert ids.ensure(job, pods, NOW + 21 * DAY) == ["digits-w0", "digits-w1"]
    renewed = admission_in(secrets, "digits-w0")
    cert = cert_of(secrets.data("digits-w0-tls")["tls.crt"])
    assert renewed.not_after == int(cert.not_valid_after_utc.timestamp()) > first.not_after
    assert (renewed.job, renewed.member) == (first.job, first.member)
    assert renewed.signed_by(ca.public_key())  # type: ignore[arg-type]
    # the renewal's new key has a new admission, in the same Secret write as its certificate
    assert renewed.key_sha256 == key_sha256(cert) != first.key_sha256


def test_a_secret_without_an_admission_of_its_member_to_its_job_is_issued_anew() -> None:
    secrets, job = FakeSecrets(), make_job(1)
    (pod,) = [live(p, "uid-0") for p in planned_pods(replicas=1)]
    issuer(secrets).ensure(job, [pod], NOW)  # the namespace's CA, and a full Secret
    authority = WorkerAuthority.from_pem(
        secrets.data(CA_SECRET)["tls.crt"], secrets.data(CA_SECRET)["tls.key"]
    )
    issued = authority.issue("digits-w0", not_before=NOW)
    key = key_sha256(cert_of(issued.cert))
    other_key = authority.issue("digits-w0", not_before=NOW, job="digits").admission
    good = authority.admit("digits", "digits-w0", NOW, issued.not_after, key=key)
    # an operator of before the key binding wrote the same admission without `key_sha256`
    old = json.dumps({k: v for k, v in good.model_dump().items() if k != "key_sha256"})
    another_job = authority.admit("another-job", "digits-w0", NOW, issued.not_after, key=key)
    for written in (None, another_job.model_dump_json().encode(), other_key, old.encode()):
        ca = secrets.data(CA_SECRET)["tls.crt"]
        body = tls_secret("ns", "digits-w0", "uid-0", {}, cert=issued.cert, key=issued.key,
                          ca=ca, admission=written)  # fmt: skip
        secrets._store(body)
        stored = v1_secret(body, 1)
        reason = renewal(stored, "uid-0", NOW, dt.timedelta(days=10), None, ("digits", "digits-w0"))
        assert reason == ("no admission of its key to the job", issued.not_after)
        assert renewal(stored, "uid-0", NOW, dt.timedelta(days=10)) == (None, issued.not_after)
        assert issuer(secrets).ensure(job, [pod], NOW) == ["digits-w0"]  # a new operator
        renewed = admission_in(secrets, "digits-w0")
        cert = cert_of(secrets.data("digits-w0-tls")["tls.crt"])
        assert (renewed.job, renewed.key_sha256) == ("digits", key_sha256(cert))
    # the Secret as this operator writes it is left alone
    body = tls_secret("ns", "digits-w0", "uid-0", {}, cert=issued.cert, key=issued.key,
                      ca=ca, admission=good.model_dump_json().encode())  # fmt: skip
    reason = renewal(v1_secret(body, 1), "uid-0", NOW, dt.timedelta(days=10), None,
                     ("digits", "digits-w0"))  # fmt: skip
    assert reason == (None, issued.not_after)


def test_the_check_admits_the_key_the_admission_was_issued_for_only() -> None:
    """Two certificates the same CA issued to one member: each one's admission admits it,
    not the other; and the key is under the signature."""
    authority = WorkerAuthority.create("ns", days=30, now=NOW)
    first = authority.issue("digits-w0", not_before=NOW, job="digits")
    second = authority.issue("digits-w0", not_before=NOW, job="digits")
    assert first.admission is not None and second.admission is not None
    keys = [key_sha256(cert_of(issued.cert)) for issued in (first, second)]
    admissions = [Admission.model_validate_json(i.admission) for i in (first, second)]  # type: ignore[arg-type]
    w0, cas, now = PeerIdentity("ns", "digits-w0"), [authority.certificate], NOW.timestamp()
    assert keys[0] != keys[1]
    for admission, key in zip(admissions, keys, strict=True):
        assert admission.key_sha256 == key
        assert unadmitted(admission, w0, key, "digits", "ns", cas, now) is None
    why = unadmitted(admissions[0], w0, keys[1], "digits", "ns", cas, now)
    assert why is not None and why.startswith("an admission for another key")
    assert keys[0][:16] in why and keys[1][:16] in why
    # moved to the other key after signing: the signature no longer holds
    moved = admissions[0].model_copy(update={"key_sha256": keys[1]})
    assert not moved.signed_by(authority.certificate.public_key())
    assert admissions[0].signed_by(authority.certificate.public_key())
    why = unadmitted(moved, w0, keys[1], "digits", "ns", cas, now)
    assert why == "an admission not signed by the CA of party ns"


def test_a_worker_refuses_its_own_admission_for_another_key_with_one_clear_line(
    tmp_path: Path,
) -> None:
    secrets, job = FakeSecrets(), make_job(1)
    (pod,) = [live(p, "uid-0") for p in planned_pods(replicas=1)]
    issuer(secrets).ensure(job, [pod], NOW)
    files = mounted(secrets, "digits-w0", tmp_path / "w0")
    authority = WorkerAuthority.from_pem(
        secrets.data(CA_SECRET)["tls.crt"], secrets.data(CA_SECRET)["tls.key"]
    )
    own = OwnAdmission(files, Verifier(files.ca), wall=NOW.timestamp)
    # the admission of another certificate of this member (another pod's of that name)
    elsewhere = authority.issue("digits-w0", not_before=NOW, job="digits").admission
    assert files.admission is not None and elsewhere is not None
    Path(files.admission).write_bytes(elsewhere)
    with pytest.raises(TlsError) as refused:
        OwnAdmission(files, Verifier(files.ca), wall=NOW.timestamp)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"{files.admission} does not admit ns/digits-w0 of {files.cert}: ")
    assert "an admission for another key than its certificate's" in message
    # a running worker keeps the one it read before
    assert own.current() == own.admission != Admission.model_validate_json(elsewhere)
    # one of before the key binding: refused at start, naming the file and the field
    old = {k: v for k, v in own.admission.model_dump().items() if k != "key_sha256"}
    Path(files.admission).write_text(json.dumps(old))
    with pytest.raises(TlsError, match=r"admission\.json is no admission \(bad key_sha256\)"):
        OwnAdmission(files, Verifier(files.ca), wall=NOW.timestamp)


def test_a_federating_operator_admits_its_pods_to_the_federation_job() -> None:
    secrets, job = FakeSecrets(), make_job(1)
    federated = Options(steps=100, worker_tls=True, party="alpha")
    (pod,) = [live(p, "uid-0") for p in planned_pods(federated, replicas=1)]
    ids = WorkerIdentities(secrets, party="alpha", trust=lambda ns: {})  # type: ignore[arg-type]
    assert ids.ensure(job, [pod], NOW) == ["digits-w0"]
    admission = admission_in(secrets, "digits-w0")
    # every party names the job by spec.federation ("mnist"), not by its own ChaosJob
    assert (admission.job, admission.party, admission.member) == ("mnist", "alpha", pod.member)
    assert pod.member == "alpha.digits-w0"
