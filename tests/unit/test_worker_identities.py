"""Worker identities in pods: the pod and Secret builders, the worker CA in memory, and
`WorkerIdentities` issuing Secrets against a fake, in-memory secrets API.

The fake stands in for the API server's secrets (create 409 when present, replace 409 on a
stale resourceVersion, read 404 when absent); the Kubernetes side itself is exercised in
`tests/controlplane/test_worker_identities_e2e.py`.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from copy import deepcopy
from typing import Any

import pytest
from chaos_operator.federation.identity import IdentityError
from chaos_operator.federation.workerca import WorkerAuthority
from chaos_operator.identities import (
    CA_SECRET,
    WorkerIdentities,
    ca_secret,
    renewal,
    wants_identity,
)
from chaos_operator.pods import ANN_CONFIG, LABEL_MEMBER, TLS_FILES, Options, tls_secret
from chaos_operator.reconcile import ObservedPod, reconcile
from chaos_worker.net.tls import identity_of
from cryptography import x509
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.unit.test_reconcile import NOW, config_of, make_job, observed

pytestmark = pytest.mark.unit

TLS = Options(steps=100, worker_tls=True)
DAY = dt.timedelta(days=1)


def planned_pods(options: Options = TLS, replicas: int = 2) -> list[dict[str, Any]]:
    return reconcile(make_job(replicas), [], now=NOW, options=options).create


def live(pod: dict[str, Any], uid: str, phase: str = "Running") -> ObservedPod:
    return observed(pod, phase, uid)


def cert_of(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


# ----------------------------------------------------------------------------- builders


def test_a_tls_pod_mounts_its_secret_read_only_and_names_only_paths() -> None:
    pod = planned_pods()[0]
    config = config_of(pod)
    assert config["tls"] == TLS_FILES.model_dump()
    spec = pod["spec"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == "tls"]
    assert volume["secret"] == {"secretName": "digits-w0-tls", "defaultMode": 0o444}
    trainer, replicator = spec["containers"]
    for container in (trainer, replicator):
        mount = {"name": "tls", "mountPath": "/etc/chaos-tls", "readOnly": True}
        assert mount in container["volumeMounts"]
    args = replicator["command"]
    assert {args[args.index(f"--tls-{k}") + 1] for k in ("cert", "key", "ca")} == {
        "/etc/chaos-tls/tls.crt",
        "/etc/chaos-tls/tls.key",
        "/etc/chaos-tls/ca.crt",
    }
    assert "PRIVATE KEY" not in json.dumps(pod)


def test_a_tls_pod_asks_for_the_state_quorum_its_job_sets() -> None:
    job = make_job(1)
    assert config_of(reconcile(job, [], now=NOW, options=TLS).create[0])["state_quorum"] == 1
    job.spec.state_quorum = 2
    assert config_of(reconcile(job, [], now=NOW, options=TLS).create[0])["state_quorum"] == 2
    # without identities nothing is sealed, so there is nothing to count
    assert "state_quorum" not in config_of(reconcile(job, [], now=NOW, options=Options()).create[0])


def test_without_worker_tls_the_pod_has_no_identity() -> None:
    pod = planned_pods(Options(steps=100))[0]
    assert "tls" not in config_of(pod)
    assert [v["name"] for v in pod["spec"]["volumes"]] == ["snapshots", "config"]
    assert not any("--tls" in a for c in pod["spec"]["containers"] for a in c["command"])
    assert not wants_identity(live(pod, "uid-w0"))


def test_the_member_secret_is_a_tls_secret_owned_by_its_pod() -> None:
    labels = {LABEL_MEMBER: "digits-w0"}
    secret = tls_secret("ns", "digits-w0", "uid-w0", labels, cert=b"C", key=b"K", ca=b"A")
    assert secret["type"] == "kubernetes.io/tls"
    assert secret["metadata"]["name"] == "digits-w0-tls"
    assert secret["metadata"]["namespace"] == "ns"
    assert secret["metadata"]["labels"] == labels
    (owner,) = secret["metadata"]["ownerReferences"]
    assert owner == {
        "apiVersion": "v1",
        "kind": "Pod",
        "name": "digits-w0",
        "uid": "uid-w0",
        "controller": True,
    }
    decoded = {k: base64.b64decode(v) for k, v in secret["data"].items()}
    assert decoded == {"tls.crt": b"C", "tls.key": b"K", "ca.crt": b"A"}


def test_only_live_tls_pods_with_a_uid_want_an_identity() -> None:
    pod = planned_pods()[0]
    assert wants_identity(live(pod, "u"))
    assert wants_identity(live(pod, "u", "Pending"))
    assert not wants_identity(live(pod, "u", "Failed"))
    assert not wants_identity(live(pod, ""))
    broken = ObservedPod("x", "Running", annotations={ANN_CONFIG: "{"}, uid="u")
    assert not wants_identity(broken)


# ---------------------------------------------------------------------------- authority


def test_the_authority_survives_pem_and_issues_member_certificates() -> None:
    ca = WorkerAuthority.create("team-a", days=365, now=NOW)
    again = WorkerAuthority.from_pem(ca.cert_pem, ca.key_pem)
    assert again.party == "team-a" and again.cert_pem == ca.cert_pem
    issued = again.issue("digits-w0", days=30, not_before=NOW)
    cert = cert_of(issued.cert)
    assert identity_of(cert).member == "digits-w0"
    assert identity_of(cert).party == "team-a"
    assert cert.issuer == ca.certificate.subject
    cert.verify_directly_issued_by(ca.certificate)
    assert issued.not_after == NOW + dt.timedelta(days=30)
    assert "PRIVATE" not in repr(issued) + repr(again)


def test_a_certificate_never_outlives_its_ca() -> None:
    ca = WorkerAuthority.create("team-a", days=10, now=NOW)
    assert ca.issue("w0", days=30, not_before=NOW).not_after == ca.not_after


def test_a_key_of_another_ca_is_refused() -> None:
    one = WorkerAuthority.create("team-a", days=10)
    other = WorkerAuthority.create("team-a", days=10)
    with pytest.raises(IdentityError, match="does not belong"):
        WorkerAuthority.from_pem(one.cert_pem, other.key_pem)
    with pytest.raises(IdentityError, match="key"):
        WorkerAuthority.from_pem(one.cert_pem, b"not a key")


# ------------------------------------------------------------------------------ renewal


def v1_secret(body: dict[str, Any], version: int) -> client.V1Secret:
    meta = body["metadata"]
    owners = [
        client.V1OwnerReference(
            api_version=o["apiVersion"], kind=o["kind"], name=o["name"], uid=o["uid"]
        )
        for o in meta.get("ownerReferences", ())
    ]
    return client.V1Secret(
        metadata=client.V1ObjectMeta(
            name=meta["name"], resource_version=str(version), owner_references=owners or None
        ),
        data=dict(body["data"]),
        type=body.get("type"),
    )


def member_secret(uid: str, not_before: dt.datetime, days: float) -> client.V1Secret:
    ca = WorkerAuthority.create("ns", days=365, now=not_before)
    issued = ca.issue("digits-w0", days=days, not_before=not_before)
    body = tls_secret("ns", "digits-w0", uid, {}, cert=issued.cert, key=issued.key, ca=b"")
    return v1_secret(body, 1)


def test_renewal_says_why_a_secret_must_be_issued() -> None:
    soon = dt.timedelta(days=10)
    assert renewal(None, "u", NOW, soon) == ("missing", None)
    fresh = member_secret("u", NOW, 30)
    assert renewal(fresh, "u", NOW, soon) == (None, NOW + dt.timedelta(days=30))
    assert renewal(fresh, "other", NOW, soon)[0] == "left by an earlier pod of that name"
    reason, end = renewal(fresh, "u", NOW + 20 * DAY, soon)
    assert reason == f"ends {(NOW + 30 * DAY).isoformat()}" and end == NOW + 30 * DAY
    fresh.data["tls.crt"] = base64.b64encode(b"garbage").decode()
    assert renewal(fresh, "u", NOW, soon)[0] == "unreadable"


# ------------------------------------------------------------------------------- issuing


class FakeSecrets:
    """The secrets API of one namespace: bodies by name, a resourceVersion each."""

    def __init__(self) -> None:
        self.bodies: dict[str, dict[str, Any]] = {}
        self.versions: dict[str, int] = {}
        self.calls: list[tuple[str, str]] = []
        self.race_on_create: dict[str, Any] | None = None
        """A body someone else creates just before our next create of that name."""

    def read_namespaced_secret(self, name: str, namespace: str) -> client.V1Secret:
        self.calls.append(("read", name))
        if name not in self.bodies:
            raise ApiException(status=404, reason="Not Found")
        return v1_secret(self.bodies[name], self.versions[name])

    def create_namespaced_secret(self, namespace: str, body: dict[str, Any]) -> None:
        name = body["metadata"]["name"]
        self.calls.append(("create", name))
        if self.race_on_create is not None and self.race_on_create["metadata"]["name"] == name:
            self._store(self.race_on_create)
            self.race_on_create = None
        if name in self.bodies:
            raise ApiException(status=409, reason="AlreadyExists")
        self._store(body)

    def replace_namespaced_secret(self, name: str, namespace: str, body: dict[str, Any]) -> None:
        self.calls.append(("replace", name))
        if body["metadata"].get("resourceVersion") != str(self.versions.get(name)):
            raise ApiException(status=409, reason="Conflict")
        self._store(body)

    def _store(self, body: dict[str, Any]) -> None:
        name = body["metadata"]["name"]
        self.bodies[name] = deepcopy(body)
        self.versions[name] = self.versions.get(name, 0) + 1

    def data(self, name: str) -> dict[str, bytes]:
        return {k: base64.b64decode(v) for k, v in self.bodies[name]["data"].items()}


def issuer(secrets: FakeSecrets) -> WorkerIdentities:
    return WorkerIdentities(secrets)  # type: ignore[arg-type]


def test_every_tls_pod_gets_a_certificate_of_the_namespace_ca_once() -> None:
    secrets, job = FakeSecrets(), make_job(2)
    pods = [live(p, f"uid-{i}") for i, p in enumerate(planned_pods())]
    ids = issuer(secrets)
    assert ids.ensure(job, pods, NOW) == ["digits-w0", "digits-w1"]
    assert [c for c in secrets.calls if c[0] == "create"] == [
        ("create", CA_SECRET),
        ("create", "digits-w0-tls"),
        ("create", "digits-w1-tls"),
    ]
    ca = secrets.data(CA_SECRET)
    ca_cert = cert_of(ca["tls.crt"])
    for pod in pods:
        files = secrets.data(f"{pod.name}-tls")
        cert = cert_of(files["tls.crt"])
        cert.verify_directly_issued_by(ca_cert)
        assert identity_of(cert).member == pod.member
        assert identity_of(cert).party == "ns"  # the namespace
        assert files["ca.crt"] == ca["tls.crt"]
        assert files["tls.key"].startswith(b"-----BEGIN PRIVATE KEY-----")
        (owner,) = secrets.bodies[f"{pod.name}-tls"]["metadata"]["ownerReferences"]
        assert owner["uid"] == pod.uid
    # the next syncs read nothing until the certificates are due
    secrets.calls.clear()
    assert ids.ensure(job, pods, NOW + DAY) == []
    assert secrets.calls == []
    # a new operator (no memory) reads each Secret once and leaves them as they are
    fresh = issuer(secrets)
    assert fresh.ensure(job, pods, NOW + DAY) == []
    assert secrets.calls == [("read", "digits-w0-tls"), ("read", "digits-w1-tls")]


def test_a_certificate_close_to_its_end_is_replaced_in_place_by_the_same_ca() -> None:
    secrets, job = FakeSecrets(), make_job(1)
    (pod,) = [live(p, "uid-0") for p in planned_pods(replicas=1)]
    ids = issuer(secrets)
    ids.ensure(job, [pod], NOW)
    first = secrets.data("digits-w0-tls")
    secrets.calls.clear()
    assert ids.ensure(job, [pod], NOW + 19 * DAY) == []
    assert secrets.calls == []
    assert ids.ensure(job, [pod], NOW + 21 * DAY) == ["digits-w0"]
    assert ("replace", "digits-w0-tls") in secrets.calls
    assert ("create", CA_SECRET) not in secrets.calls
    renewed = secrets.data("digits-w0-tls")
    assert renewed["tls.key"] != first["tls.key"]
    assert renewed["ca.crt"] == first["ca.crt"]
    end = cert_of(renewed["tls.crt"]).not_valid_after_utc
    assert end > NOW + 21 * DAY + 29 * DAY


def test_a_secret_left_by_an_earlier_pod_of_that_name_is_taken_over() -> None:
    secrets, job = FakeSecrets(), make_job(1)
    (planned,) = planned_pods(replicas=1)
    issuer(secrets).ensure(job, [live(planned, "uid-old")], NOW)
    reborn = live(planned, "uid-new")
    assert issuer(secrets).ensure(job, [reborn], NOW) == ["digits-w0"]
    (owner,) = secrets.bodies["digits-w0-tls"]["metadata"]["ownerReferences"]
    assert owner["uid"] == "uid-new"


def test_a_concurrent_write_is_left_to_the_next_sync() -> None:
    secrets, job = FakeSecrets(), make_job(1)
    (planned,) = planned_pods(replicas=1)
    pod = live(planned, "uid-0")
    ids = issuer(secrets)
    ids.ensure(job, [], NOW)  # nothing to do, nothing read
    assert secrets.calls == []
    stranger = tls_secret("ns", "digits-w0", "uid-x", {}, cert=b"", key=b"", ca=b"")
    secrets.race_on_create = stranger
    assert ids.ensure(job, [pod], NOW) == []  # 409: someone else's Secret won
    assert ids.ensure(job, [pod], NOW) == ["digits-w0"]  # the next sync takes it over
    (owner,) = secrets.bodies["digits-w0-tls"]["metadata"]["ownerReferences"]
    assert owner["uid"] == "uid-0"


def test_a_ca_made_meanwhile_by_another_is_the_one_used() -> None:
    secrets, job = FakeSecrets(), make_job(1)
    theirs = WorkerAuthority.create("ns", days=365, now=NOW)
    secrets.race_on_create = ca_secret("ns", theirs)
    (pod,) = [live(p, "uid-0") for p in planned_pods(replicas=1)]
    assert issuer(secrets).ensure(job, [pod], NOW) == ["digits-w0"]
    cert_of(secrets.data("digits-w0-tls")["tls.crt"]).verify_directly_issued_by(theirs.certificate)


def test_a_ca_near_its_end_is_reported_not_silently_replaced(
    caplog: pytest.LogCaptureFixture,
) -> None:
    secrets, job = FakeSecrets(), make_job(1)
    old = ca_secret("ns", WorkerAuthority.create("ns", days=5, now=NOW))
    secrets._store(old)
    (pod,) = [live(p, "uid-0") for p in planned_pods(replicas=1)]
    assert issuer(secrets).ensure(job, [pod], NOW) == []
    assert "digits-w0-tls" not in secrets.bodies
    assert secrets.bodies[CA_SECRET] == old
    assert "delete it (between jobs)" in caplog.text
