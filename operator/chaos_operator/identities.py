"""Worker identities on Kubernetes: the operator issues every worker pod its certificate.

Per namespace, the operator keeps one worker CA (`federation.workerca.WorkerAuthority`) in
the Secret `chaos-worker-ca`, made the first time a pod there needs a certificate and never
replaced by the operator (deleting it starts a new CA: do that between jobs, as pods issued
by the old one no longer verify the new ones). The party its certificates name is the
namespace: `chaos://<namespace>/<member id>`. Its key can mint any member of the namespace,
so it is no more than the namespace's Secrets hold already: every member's key.

Every live pod whose config has `tls` (`Options.worker_tls`) gets the Secret `<pod>-tls`
(`pods.tls_secret`), owned by the pod so that the garbage collector removes it with the pod.
Beside the certificate it holds the member's admission to its job (`admission.json`,
`chaos_worker.config.Admission`, signed by the same CA, bound to the certificate's key and
valid as long as the certificate; `admitted_job`: the ChaosJob's name, or its federation's
when federating), without which the job's workers refuse its join
(`chaos_worker.membership.joiners`). `WorkerIdentities.ensure` is level-based, like the
reconcile: on every sync of a job it issues a certificate and admission for each pod whose
Secret is missing, belongs to an earlier pod of the same name, cannot be read, ends within
`renew_before`, or holds no admission of that member to that job for the key of its
certificate (one written before admissions, or before their key binding, is none).
Certificate, key and admission are always written together, in one update of the Secret;
the kubelet then updates the files of a running pod, whose trainer and replicator take them
up at their next connection (and its next join proposal, the admission).
Certificates live `days` (30); a Secret checked once is not read again until it is due. A CA
that cannot be used is logged and issues nothing: the pods wait (the kubelet reports the
missing Secret). Key material never reaches a log line, an Event or an annotation.

Federation (`party`): the CA is made for the operator's party (`chaos://<party>/<member
id>`, `path_length=1`), and `trust` gives, per namespace, the other parties' worker CAs the
federation sync brought. Each pod's `ca.crt` is then our CA plus each of them cross-certified
(`WorkerAuthority.bundle`); a pod whose bundle means other trust than that (`trust_of`: a
party's CA arrived or changed) is issued anew, at the sync the new CA triggers.

RBAC in each watched namespace: `secrets` get, create, update.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from chaos_worker.config import Admission, key_sha256
from cryptography import x509
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from chaos_operator.api import ChaosJob
from chaos_operator.federation.identity import IdentityError, parse_certificate
from chaos_operator.federation.workerca import LEEWAY, Trust, WorkerAuthority, trust_of
from chaos_operator.pods import (
    ADMISSION_KEY,
    ANN_CONFIG,
    COMMON_LABELS,
    job_meta,
    tls_secret,
    tls_secret_name,
)
from chaos_operator.reconcile import ObservedPod

CA_SECRET = "chaos-worker-ca"
CERT_DAYS = 30.0
RENEW_BEFORE = dt.timedelta(days=10)
CA_DAYS = 3650.0
log = logging.getLogger("chaos_operator")


def wants_identity(pod: ObservedPod) -> bool:
    """A live pod whose worker config has `tls`: it mounts `<pod>-tls`."""
    if not pod.live or not pod.uid:
        return False
    try:
        config = json.loads(pod.annotations.get(ANN_CONFIG, "{}"))
    except json.JSONDecodeError:
        return False
    return isinstance(config, dict) and bool(config.get("tls"))


def secret_bytes(secret: client.V1Secret, key: str) -> bytes:
    """One entry of a Secret's `data`, decoded (empty when absent)."""
    return base64.b64decode((secret.data or {}).get(key) or "")


def admitted_job(job: ChaosJob, party: str | None) -> str:
    """The job a pod's admission names: the federation's name when federating (every party
    names the job alike), else the ChaosJob's (the namespace is the party)."""
    return job.spec.federation if party else job_meta(job)[0]


def admits(secret: client.V1Secret, job: str, member: str, cert: x509.Certificate) -> bool:
    """Whether the Secret holds an admission of `member` to `job` for the key of `cert`, its
    certificate (its signature is ours: only this operator writes it). One of before the key
    binding is none: it does not parse."""
    try:
        admission = Admission.model_validate_json(secret_bytes(secret, ADMISSION_KEY))
    except (ValueError, TypeError):
        return False
    named = admission.job == job and admission.member == member
    return named and admission.key_sha256 == key_sha256(cert)


def renewal(
    secret: client.V1Secret | None,
    pod_uid: str,
    now: dt.datetime,
    renew_before: dt.timedelta,
    trust: Trust | None = None,
    admission: tuple[str, str] | None = None,
) -> tuple[str | None, dt.datetime | None]:
    """(why the pod's Secret must be issued anew, or None; the end of the certificate it holds,
    when it holds one). `trust`: what its `ca.crt` must mean; `admission`: the (job, member)
    its admission must name (None: either not checked)."""
    if secret is None:
        return "missing", None
    owners = (secret.metadata and secret.metadata.owner_references) or ()
    if not any(ref.uid == pod_uid for ref in owners):
        return "left by an earlier pod of that name", None
    try:
        cert = parse_certificate(secret_bytes(secret, "tls.crt"))
    except ValueError:
        return "unreadable", None
    end = cert.not_valid_after_utc
    if end - now <= renew_before:
        return f"ends {end.isoformat()}", end
    if trust is not None and trust_of(secret_bytes(secret, "ca.crt")) != trust:
        return "the trusted parties changed", end
    if admission is not None and not admits(secret, *admission, cert):
        return "no admission of its key to the job", end
    return None, end


def ca_secret(namespace: str, authority: WorkerAuthority) -> dict[str, Any]:
    """The Secret that keeps a namespace's worker CA."""
    data = {"tls.crt": authority.cert_pem, "tls.key": authority.key_pem}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": {
            "name": CA_SECRET,
            "namespace": namespace,
            "labels": {**COMMON_LABELS, "app.kubernetes.io/component": "worker-ca"},
        },
        "data": {k: base64.b64encode(v).decode() for k, v in data.items()},
    }


class WorkerIdentities:
    """Issues the certificates of worker pods into Secrets (see the module docstring)."""

    def __init__(
        self,
        core: client.CoreV1Api,
        *,
        days: float = CERT_DAYS,
        renew_before: dt.timedelta = RENEW_BEFORE,
        party: str | None = None,
        trust: Callable[[str], Mapping[str, x509.Certificate]] | None = None,
    ) -> None:
        self.core = core
        self.days = days
        self.renew_before = renew_before
        self.party = party
        """The federating operator's party (None: the namespace is the party)."""
        self.trust = trust
        """Namespace -> the other parties' worker CAs, by party (the federation's)."""
        self._due: dict[tuple[str, str], dict[str, tuple[dt.datetime, Trust | None]]] = {}
        """(namespace, job) -> pod uid -> (when its Secret must be looked at again, the
        trust its bundle was written with)."""
        self._authorities: dict[str, WorkerAuthority] = {}
        """The worker CA of each namespace, as last read (for the bundles and `ca_pem`)."""

    def ca_pem(self, namespace: str) -> bytes | None:
        """Our worker CA of `namespace` (PEM), once this operator has read or made it."""
        authority = self._authorities.get(namespace)
        return authority.cert_pem if authority else None

    def forget(self, namespace: str, name: str) -> None:
        """The job is gone: drop what is known of its pods."""
        self._due.pop((namespace, name), None)

    def ensure(self, job: ChaosJob, pods: Sequence[ObservedPod], now: dt.datetime) -> list[str]:
        """Issue the Secrets `pods` of `job` lack (see the module docstring); the names of the
        pods issued a certificate. A Secret written meanwhile by someone else (409) is left to
        the next sync."""
        name, namespace, _ = job_meta(job)
        known = self._due.get((namespace, name), {})
        due: dict[str, tuple[dt.datetime, Trust | None]] = {}
        issued: list[str] = []
        wanting = [pod for pod in pods if wants_identity(pod)]
        authority: WorkerAuthority | None = None
        peers = self.trust(namespace) if self.trust else {}
        try:
            if wanting and self.party and namespace not in self._authorities:
                authority = self._authority(namespace, now)  # to publish it to the peers
            trust = self._bundle(namespace, peers)[1]
        except IdentityError as exc:
            log.warning("%s/%s: no certificates issued: %s", namespace, name, exc)
            return issued
        for pod in wanting:
            if pod.uid in known and now < known[pod.uid][0] and known[pod.uid][1] == trust:
                due[pod.uid] = known[pod.uid]
                continue
            secret = self._read(namespace, tls_secret_name(pod.name))
            admission = (admitted_job(job, self.party), pod.member)
            reason, end = renewal(secret, pod.uid, now, self.renew_before, trust, admission)
            if reason is not None:
                try:
                    authority = authority or self._authority(namespace, now)
                    bundle, trust = self._bundle(namespace, peers)
                except IdentityError as exc:
                    log.warning("%s/%s: no certificates issued: %s", namespace, name, exc)
                    break
                assert bundle is not None
                issued_to = (namespace, admission[0])
                end = self._issue(authority, issued_to, pod, secret, now, bundle)
                if end is None:
                    continue
                issued.append(pod.name)
                log.info("%s/%s: certificate issued (%s)", namespace, pod.name, reason)
            assert end is not None
            due[pod.uid] = (end - self.renew_before, trust)
        self._due[(namespace, name)] = due
        return issued

    def _bundle(
        self, namespace: str, peers: Mapping[str, x509.Certificate]
    ) -> tuple[bytes | None, Trust | None]:
        """The pods' `ca.crt` in `namespace` and what it means; (None, None) while the CA is
        not known yet (IdentityError: a peer CA that cannot be cross-certified)."""
        authority = self._authorities.get(namespace)
        if authority is None:
            return None, None
        try:
            bundle = authority.bundle({p: c for p, c in peers.items() if p != authority.party})
        except ValueError as exc:
            raise IdentityError(f"cannot cross-certify the other parties' CAs: {exc}") from None
        return bundle, trust_of(bundle)

    def _issue(
        self,
        authority: WorkerAuthority,
        to: tuple[str, str],
        pod: ObservedPod,
        existing: client.V1Secret | None,
        now: dt.datetime,
        bundle: bytes,
    ) -> dt.datetime | None:
        """Write a new certificate of `pod` and its admission to the job into its Secret in
        the namespace (`to`: namespace, job), replacing `existing` as read; the certificate's
        end, or None on a conflict."""
        namespace, job = to
        cert = authority.issue(pod.member, days=self.days, not_before=now - LEEWAY, job=job)
        body = tls_secret(namespace, pod.name, pod.uid, pod.labels, cert=cert.cert,
                          key=cert.key, ca=bundle, admission=cert.admission)  # fmt: skip
        try:
            if existing is None:
                self.core.create_namespaced_secret(namespace, body)
            else:  # as read: a change since is a conflict
                body["metadata"]["resourceVersion"] = existing.metadata.resource_version
                self.core.replace_namespaced_secret(body["metadata"]["name"], namespace, body)
        except ApiException as exc:
            if exc.status == 409:
                return None
            raise
        return cert.not_after

    def _read(self, namespace: str, name: str) -> client.V1Secret | None:
        try:
            return self.core.read_namespaced_secret(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def _authority(self, namespace: str, now: dt.datetime) -> WorkerAuthority:
        """The namespace's worker CA, made and stored the first time, and kept as the one in
        force (IdentityError if the stored one cannot be read, ends within `renew_before`, or
        is not of this operator's party or cannot cross-certify while it federates)."""
        authority = self._read_authority(namespace, now)
        cached = self._authorities.get(namespace)
        if cached is None or cached.cert_pem != authority.cert_pem:
            self._authorities[namespace] = authority
        return self._authorities[namespace]  # the same one keeps its cross certificates

    def _read_authority(self, namespace: str, now: dt.datetime) -> WorkerAuthority:
        party = self.party or namespace
        secret = self._read(namespace, CA_SECRET)
        if secret is None:
            authority = WorkerAuthority.create(
                party, days=CA_DAYS, now=now, path_length=1 if self.party else 0
            )
            try:
                self.core.create_namespaced_secret(namespace, ca_secret(namespace, authority))
            except ApiException as exc:
                if exc.status != 409:
                    raise
                return self._read_authority(namespace, now)  # made meanwhile: use that one
            log.info("%s: made the worker CA %s (secret %s)", namespace, authority, CA_SECRET)
            return authority
        authority = WorkerAuthority.from_pem(
            secret_bytes(secret, "tls.crt"), secret_bytes(secret, "tls.key")
        )
        if authority.party != party or (self.party and not authority.cross_certifies):
            raise IdentityError(
                f"{namespace}: the worker CA in Secret {CA_SECRET} is for party "
                f"{authority.party!r}, this operator's is {party!r}"
                + (" (and federating, it must be able to cross-certify)" if self.party else "")
                + "; delete it (between jobs) for a new one"
            )
        if authority.not_after - now <= self.renew_before:
            raise IdentityError(
                f"{namespace}: the worker CA in Secret {CA_SECRET} ends "
                f"{authority.not_after.isoformat()}; delete it (between jobs) for a new one"
            )
        return authority
