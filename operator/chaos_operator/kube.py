"""The operator's Kubernetes edge: `KubePods`, the `PodBackend` on the `kubernetes` client.

Also the calls the federation shares: `list_objects` (ChaosJobs or ChaosPeers in the watched
namespaces) and `post_event` (a core/v1 Event about a ChaosJob or ChaosPeer).

Writes are level-based: creating what exists (409) or deleting what is gone (404) is not an
error, only reported as False (`ignoring`), and a status patch of a job deleted meanwhile
(404) is dropped. Any other API error propagates to the controller.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from chaos_operator.api import API_VERSION, GROUP, VERSION, ChaosJob
from chaos_operator.pods import ANN_NEXT_MEMBER, job_meta, selector
from chaos_operator.reconcile import ObservedPod, PodEvent

PLURAL = "chaosjobs"
FIELD_MANAGER = "chaos-operator"
log = logging.getLogger("chaos_operator")


def termination_message(pod: client.V1Pod) -> tuple[int | None, int | None]:
    """(last step completed, newest checkpoint) that the pod's ended trainer wrote in its
    termination message (`{"step": N, "checkpoint": S}` in `/dev/termination-log`, which the
    kubelet copies into the container's status); None for what it did not say usably."""
    for container in (pod.status and pod.status.container_statuses) or ():
        ended = container.state and container.state.terminated
        if container.name != "trainer" or not ended or not ended.message:
            continue
        try:
            said = json.loads(ended.message)
        except ValueError:
            return None, None
        if not isinstance(said, dict):
            return None, None
        return _count(said.get("step")), _count(said.get("checkpoint"))
    return None, None


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def observe_pod(pod: client.V1Pod) -> ObservedPod:
    """The reconcile's view of one pod."""
    meta, status = pod.metadata, pod.status
    conditions = (status and status.conditions) or ()
    step, checkpoint = termination_message(pod)
    return ObservedPod(
        name=meta.name,
        phase=(status and status.phase) or "Pending",
        uid=meta.uid or "",
        labels=dict(meta.labels or {}),
        annotations=dict(meta.annotations or {}),
        ready=any(c.type == "Ready" and c.status == "True" for c in conditions),
        deleting=meta.deletion_timestamp is not None,
        ip=(status and status.pod_ip) or None,
        unschedulable=any(
            c.type == "PodScheduled" and c.status == "False" and c.reason == "Unschedulable"
            for c in conditions
        ),
        final_step=step,
        final_checkpoint=checkpoint,
    )


def ignoring(status: int, call: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
    """Run `call`; False when it failed with HTTP `status` (409 exists, 404 gone)."""
    try:
        call(*args, **kwargs)
    except ApiException as exc:
        if exc.status == status:
            return False
        raise
    return True


def post_event(core: client.CoreV1Api, body: Mapping[str, Any], reason: str, message: str,
               type_: str = "Normal") -> None:  # fmt: skip
    """A core/v1 Event about the ChaosJob (or ChaosPeer) `body` (best effort)."""
    meta = body["metadata"]
    now = datetime.now(UTC)
    event = client.CoreV1Event(
        metadata=client.V1ObjectMeta(generate_name=f"{meta['name']}.", namespace=meta["namespace"]),
        involved_object=client.V1ObjectReference(
            api_version=body["apiVersion"],
            kind=body.get("kind", "ChaosJob"),
            name=meta["name"],
            namespace=meta["namespace"],
            uid=meta["uid"],
        ),
        reason=reason,
        message=message[:1024],
        type=type_,
        first_timestamp=now,
        last_timestamp=now,
        count=1,
        source=client.V1EventSource(component=FIELD_MANAGER),
        reporting_component=FIELD_MANAGER,
        reporting_instance=FIELD_MANAGER,
    )
    try:
        core.create_namespaced_event(meta["namespace"], event)
    except ApiException as exc:
        log.warning("event %s on %s not posted: %s", reason, meta["name"], exc.reason)


def list_objects(
    api: client.ApiClient, namespaces: tuple[str, ...], plural: str
) -> list[dict[str, Any]]:
    """Every chaos.training.dev object of kind `plural` in `namespaces` (empty: all)."""
    custom = client.CustomObjectsApi(api)
    if not namespaces:
        return custom.list_cluster_custom_object(GROUP, VERSION, plural)["items"]
    items: list[dict[str, Any]] = []
    for ns in namespaces:
        items += custom.list_namespaced_custom_object(GROUP, VERSION, ns, plural)["items"]
    return items


class KubePods:
    """`controller.PodBackend` on the Kubernetes API, for the jobs in `namespaces` (empty:
    every namespace)."""

    def __init__(self, api: client.ApiClient, namespaces: tuple[str, ...] = ()) -> None:
        self.api = api
        self.namespaces = namespaces
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)

    def list_jobs(self) -> list[tuple[str, str]]:
        items = list_objects(self.api, self.namespaces, PLURAL)
        return [(i["metadata"]["namespace"], i["metadata"]["name"]) for i in items]

    def get_job(self, namespace: str, name: str) -> ChaosJob | None:
        """The job; None when it is gone or being deleted (the garbage collector takes the
        pods)."""
        try:
            body = self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        if body["metadata"].get("deletionTimestamp"):
            return None
        return ChaosJob.model_validate(body)

    def observe(self, job: ChaosJob) -> list[ObservedPod]:
        """The job's pods: labelled with its name and owned by this very job (a job re-created
        under the same name has a new uid)."""
        name, namespace, uid = job_meta(job)
        listed = self.core.list_namespaced_pod(namespace, label_selector=selector(name)).items
        return [
            observe_pod(p)
            for p in listed
            if any(ref.uid == uid for ref in p.metadata.owner_references or ())
        ]

    def set_next_member(self, job: ChaosJob, ordinal: int) -> None:
        name, namespace, _ = job_meta(job)
        patch = {"metadata": {"annotations": {ANN_NEXT_MEMBER: str(ordinal)}}}
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, patch)

    def ensure_service(self, job: ChaosJob, body: dict[str, Any]) -> None:
        ignoring(409, self.core.create_namespaced_service, job_meta(job)[1], body)

    def create(self, job: ChaosJob, body: dict[str, Any]) -> bool:
        return ignoring(409, self.core.create_namespaced_pod, job_meta(job)[1], body)

    def ensure_claim(self, job: ChaosJob, body: dict[str, Any]) -> None:
        ignoring(409, self.core.create_namespaced_persistent_volume_claim, job_meta(job)[1], body)

    def delete(self, job: ChaosJob, name: str) -> bool:
        return ignoring(404, self.core.delete_namespaced_pod, name, job_meta(job)[1])

    def activate(self, job: ChaosJob, name: str, patch: dict[str, Any]) -> bool:
        """A strategic merge patch of the spare's labels and annotations: the kubelet then
        rewrites its projected config file, which the waiting worker re-reads."""
        return ignoring(404, self.core.patch_namespaced_pod, name, job_meta(job)[1], patch)

    def post_event(self, job: ChaosJob, event: PodEvent) -> None:
        name, namespace, uid = job_meta(job)
        about = {
            "apiVersion": API_VERSION,
            "kind": "ChaosJob",
            "metadata": {"name": name, "namespace": namespace, "uid": uid},
        }
        post_event(self.core, about, event.reason, event.message, event.type)

    def delete_job(self, job: ChaosJob) -> None:
        name, namespace, _ = job_meta(job)
        log.info("%s/%s: deleting the finished job (ttlSecondsAfterFinished)", namespace, name)
        ignoring(404, self.custom.delete_namespaced_custom_object, GROUP, VERSION, namespace,
                 PLURAL, name)  # fmt: skip

    def patch_status(self, job: ChaosJob, status: dict[str, Any]) -> None:
        name, namespace, _ = job_meta(job)
        ignoring(
            404,
            self.custom.patch_namespaced_custom_object_status,
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
            {"status": status},
        )
