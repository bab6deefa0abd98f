"""Worker identities on Kubernetes: the operator issues every worker pod its certificate.

Per namespace, the operator keeps one worker CA (`federation.workerca.WorkerAuthority`) in
the Secret `chaos-worker-ca`, made the first time a pod there needs a certificate and never
replaced by the operator (deleting it starts a new CA: do that between jobs, as pods issued
by the old one no longer verify the new ones). The party its certificates name is the
namespace: `chaos://<namespace>/<member id>`. Its key can mint any member of the namespace,
so it is no more than the namespace's Secrets hold already: every member's key.

Every live pod whose config has `tls` (`Options.worker_tls`) gets the Secret `<pod>-tls`
(`pods.tls_secret`), owned by the pod so that the garbage collector removes it with the pod.
`WorkerIdentities.ensure` is level-based, like the reconcile: on every sync of a job it
issues a certificate for each pod whose Secret is missing, belongs to an earlier pod of the
same name, cannot be read, or ends within `renew_before`; the kubelet then updates the files
of a running pod, whose trainer and replicator take them up at their next connection.
Certificates live `days` (30); a Secret checked once is not read again until it is due. A CA
that cannot be used is logged and issues nothing: the pods wait (the kubelet reports the
missing Secret). Key material never reaches a log line, an Event or an annotation.

RBAC in each watched namespace: `secrets` get, create, update.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
from collections.abc import Sequence
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from chaos_operator.api import ChaosJob
from chaos_operator.federation.identity import IdentityError, parse_certificate
from chaos_operator.federation.workerca import LEEWAY, WorkerAuthority
from chaos_operator.pods import ANN_CONFIG, COMMON_LABELS, job_meta, tls_secret, tls_secret_name
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


def renewal(
    secret: client.V1Secret | None, pod_uid: str, now: dt.datetime, renew_before: dt.timedelta
) -> tuple[str | None, dt.datetime | None]:
    """(why the pod's Secret must be issued anew, or None; the end of the certificate it holds,
    when it holds one)."""
    if secret is None:
        return "missing", None
    owners = (secret.metadata and secret.metadata.owner_references) or ()
    if not any(ref.uid == pod_uid for ref in owners):
        return "left by an earlier pod of that name", None
    try:
        end = parse_certificate(secret_bytes(secret, "tls.crt")).not_valid_after_utc
    except ValueError:
        return "unreadable", None
    if end - now <= renew_before:
        return f"ends {end.isoformat()}", end
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
    ) -> None:
        self.core = core
        self.days = days
        self.renew_before = renew_before
        self._due: dict[tuple[str, str], dict[str, dt.datetime]] = {}
        """(namespace, job) -> pod uid -> when its Secret must be looked at again."""

    def forget(self, namespace: str, name: str) -> None:
        """The job is gone: drop what is known of its pods."""
        self._due.pop((namespace, name), None)

    def ensure(self, job: ChaosJob, pods: Sequence[ObservedPod], now: dt.datetime) -> list[str]:
        """Issue the Secrets `pods` of `job` lack (see the module docstring); the names of the
        pods issued a certificate. A Secret written meanwhile by someone else (409) is left to
        the next sync."""
        name, namespace, _ = job_meta(job)
        known = self._due.get((namespace, name), {})
        due: dict[str, dt.datetime] = {}
        issued: list[str] = []
        authority: WorkerAuthority | None = None
        for pod in pods:
            if not wants_identity(pod):
                continue
            if pod.uid in known and now < known[pod.uid]:
                due[pod.uid] = known[pod.uid]
                continue
            secret = self._read(namespace, tls_secret_name(pod.name))
            reason, end = renewal(secret, pod.uid, now, self.renew_before)
            if reason is not None:
                try:
                    authority = authority or self._authority(namespace, now)
                except IdentityError as exc:
                    log.warning("%s/%s: no certificates issued: %s", namespace, name, exc)
                    break
                end = self._issue(authority, namespace, pod, secret, now)
                if end is None:
                    continue
                issued.append(pod.name)
                log.info("%s/%s: certificate issued (%s)", namespace, pod.name, reason)
            assert end is not None
            due[pod.uid] = end - self.renew_before
        self._due[(namespace, name)] = due
        return issued

    def _issue(
        self,
        authority: WorkerAuthority,
        namespace: str,
        pod: ObservedPod,
        existing: client.V1Secret | None,
        now: dt.datetime,
    ) -> dt.datetime | None:
        """Write a new certificate of `pod` into its Secret (replacing `existing` as read);
        the certificate's end, or None on a conflict."""
        cert = authority.issue(pod.member, days=self.days, not_before=now - LEEWAY)
        body = tls_secret(namespace, pod.name, pod.uid, pod.labels,
                          cert=cert.cert, key=cert.key, ca=authority.cert_pem)  # fmt: skip
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
        """The namespace's worker CA, made and stored the first time (IdentityError if the
        stored one cannot be read or ends within `renew_before`)."""
        secret = self._read(namespace, CA_SECRET)
        if secret is None:
            authority = WorkerAuthority.create(namespace, days=CA_DAYS, now=now)
            try:
                self.core.create_namespaced_secret(namespace, ca_secret(namespace, authority))
            except ApiException as exc:
                if exc.status != 409:
                    raise
                return self._authority(namespace, now)  # made meanwhile: use that one
            log.info("%s: made the worker CA %s (secret %s)", namespace, authority, CA_SECRET)
            return authority
        authority = WorkerAuthority.from_pem(
            secret_bytes(secret, "tls.crt"), secret_bytes(secret, "tls.key")
        )
        if authority.not_after - now <= self.renew_before:
            raise IdentityError(
                f"{namespace}: the worker CA in Secret {CA_SECRET} ends "
                f"{authority.not_after.isoformat()}; delete it (between jobs) for a new one"
            )
        return authority
