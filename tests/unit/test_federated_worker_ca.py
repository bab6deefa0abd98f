"""A federating operator's worker identities: its CA is made for its party and may
cross-certify, and the pods' trust bundles follow the other parties' worker CAs that the
federation sync brings (`WorkerIdentities(party=..., trust=...)`), against the in-memory
secrets API of `test_worker_identities`."""

from __future__ import annotations

import pytest
from chaos_operator.federation.workerca import WorkerAuthority, party_constraint, trust_of
from chaos_operator.identities import CA_SECRET, WorkerIdentities, ca_secret
from chaos_operator.pods import Options
from chaos_worker.net.tls import bound_parties, identity_of
from cryptography import x509

from tests.unit.test_reconcile import NOW, make_job
from tests.unit.test_worker_identities import DAY, FakeSecrets, cert_of, live, planned_pods

pytestmark = pytest.mark.unit

FEDERATED = Options(steps=100, worker_tls=True, party="alpha")


def federating(secrets: FakeSecrets, trust: dict[str, x509.Certificate]) -> WorkerIdentities:
    return WorkerIdentities(secrets, party="alpha", trust=lambda ns: trust)  # type: ignore[arg-type]


def test_the_ca_names_the_party_and_the_bundles_follow_the_trusted_parties() -> None:
    secrets, job, trust = FakeSecrets(), make_job(2), {}
    pods = [live(p, f"uid-{i}") for i, p in enumerate(planned_pods(FEDERATED))]
    ids = federating(secrets, trust)
    assert ids.ensure(job, pods, NOW) == ["digits-w0", "digits-w1"]
    ca = cert_of(secrets.data(CA_SECRET)["tls.crt"])
    assert ids.ca_pem("ns") == secrets.data(CA_SECRET)["tls.crt"]  # what the sync publishes
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 1
    leaf = cert_of(secrets.data("digits-w0-tls")["tls.crt"])
    assert identity_of(leaf).party == "alpha" and identity_of(leaf).member == "alpha.digits-w0"
    assert secrets.data("digits-w0-tls")["ca.crt"] == ids.ca_pem("ns")
    # beta's CA arrives: every pod's bundle gets it, cross-certified and bound to beta
    beta = WorkerAuthority.create("beta", days=365, now=NOW, path_length=1)
    trust["beta"] = beta.certificate
    secrets.calls.clear()
    assert ids.ensure(job, pods, NOW + DAY) == ["digits-w0", "digits-w1"]
    first = secrets.data("digits-w0-tls")["ca.crt"]
    anchor, cross = x509.load_pem_x509_certificates(first)
    assert anchor == ca
    cross.verify_directly_issued_by(ca)
    assert cross.public_key() == beta.certificate.public_key()
    assert cross.subject == beta.certificate.subject
    assert bound_parties(cross) == {"beta"}
    limit = cross.extensions.get_extension_for_class(x509.BasicConstraints)
    assert limit.value.path_length == 0
    assert cross.extensions.get_extension_for_class(x509.NameConstraints).critical
    # nothing changed: nothing read; a restarted operator reads, finds the same trust
    # (in other certificates: new serials and signatures), and issues nothing
    secrets.calls.clear()
    assert ids.ensure(job, pods, NOW + 2 * DAY) == []
    assert secrets.calls == []
    assert federating(secrets, trust).ensure(job, pods, NOW + 2 * DAY) == []
    assert all(call[0] == "read" for call in secrets.calls)
    # beta's CA replaced by another: the bundles follow
    trust["beta"] = WorkerAuthority.create("beta", days=365, now=NOW, path_length=1).certificate
    assert ids.ensure(job, pods, NOW + 3 * DAY) == ["digits-w0", "digits-w1"]
    assert trust_of(secrets.data("digits-w1-tls")["ca.crt"]) != trust_of(first)


def test_trust_means_keys_and_bounds_not_bytes() -> None:
    alpha = WorkerAuthority.create("alpha", days=365, now=NOW, path_length=1)
    beta = WorkerAuthority.create("beta", days=365, now=NOW, path_length=1)
    again = WorkerAuthority(alpha.party, alpha._key, alpha.certificate)  # no cached cross
    one, two = alpha.bundle({"beta": beta.certificate}), again.bundle({"beta": beta.certificate})
    assert one != two and trust_of(one) == trust_of(two)
    assert trust_of(alpha.bundle({"gamma": beta.certificate})) != trust_of(one)
    assert party_constraint("beta") in {bound for _, bound in trust_of(one)}
    assert trust_of(b"garbage") == frozenset()


@pytest.mark.parametrize(
    "stored",
    [
        lambda: WorkerAuthority.create("ns", days=365, now=NOW, path_length=1),  # the namespace's
        lambda: WorkerAuthority.create("alpha", days=365, now=NOW),  # cannot cross-certify
    ],
    ids=["other-party", "path-length-0"],
)
def test_a_ca_unfit_for_federation_is_reported_not_used(stored, caplog) -> None:
    secrets, job = FakeSecrets(), make_job(1)
    secrets._store(ca_secret("ns", stored()))
    (pod,) = [live(p, "uid-0") for p in planned_pods(FEDERATED, replicas=1)]
    assert federating(secrets, {}).ensure(job, [pod], NOW) == []
    assert "digits-w0-tls" not in secrets.bodies
    assert "delete it (between jobs)" in caplog.text
