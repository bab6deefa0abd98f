"""The operator's admissions: each pod's `<pod>-tls` Secret carries the member's admission
to its job (`admission.json`), signed by the namespace's worker CA, valid as long as the
certificate and renewed with it; a Secret without one (written before admissions) or with
one of another job is issued anew. What the operator writes is what the worker checks
(`chaos_worker.membership.joiners`), read back from the files as the pod mounts them.
Against the in-memory secrets API of `test_worker_identities`."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from chaos_operator.federation.workerca import WorkerAuthority
from chaos_operator.identities import CA_SECRET, WorkerIdentities, renewal
from chaos_operator.pods import ADMISSION_KEY, TLS_FILES, Options, tls_secret
from chaos_worker.config import Admission, TlsFiles, key_sha256
from chaos_worker.membership.joiners import OwnAdmission, unadmitted
from chaos_worker.net.signing import Verifier
from chaos_worker.net.tls import identity_of
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


def test_a_secret_without_an_admission_of_its_member_to_its_job_is_issued_anew() -> None:
    secrets, job = FakeSecrets(), make_job(1)
    (pod,) = [live(p, "uid-0") for p in planned_pods(replicas=1)]
    issuer(secrets).ensure(job, [pod], NOW)  # the namespace's CA, and a full Secret
    authority = WorkerAuthority.from_pem(
        secrets.data(CA_SECRET)["tls.crt"], secrets.data(CA_SECRET)["tls.key"]
    )
    issued = authority.issue("digits-w0", not_before=NOW)
    key = key_sha256(cert_of(issued.cert))
    another_job = authority.admit("another-job", "digits-w0", NOW, issued.not_after, key=key)
    for admission in (None, another_job):
        written = admission.model_dump_json().encode() if admission else None
        ca = secrets.data(CA_SECRET)["tls.crt"]
        body = tls_secret("ns", "digits-w0", "uid-0", {}, cert=issued.cert, key=issued.key,
                          ca=ca, admission=written)  # fmt: skip
        secrets._store(body)
        stored = v1_secret(body, 1)
        reason = renewal(stored, "uid-0", NOW, dt.timedelta(days=10), None, ("digits", "digits-w0"))
        assert reason == ("no admission to the job", issued.not_after)
        assert renewal(stored, "uid-0", NOW, dt.timedelta(days=10)) == (None, issued.not_after)
        assert issuer(secrets).ensure(job, [pod], NOW) == ["digits-w0"]  # a new operator
        assert admission_in(secrets, "digits-w0").job == "digits"


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
