"""kopf handlers of the Chaos operator: observe, call the pure reconcile, apply the plan.

Everything that decides lives in `chaos_operator.reconcile`; this module only reads the
ChaosJob and its pods from the API server, applies the plan with the `kubernetes` client
(create and ignore 409, delete and ignore 404, merge-patch the status subresource) and posts
Events for membership changes.

Triggers (all level-based: each one reconciles the job from what the API server says now):

* every watch event of a ChaosJob (kopf delivers the initial listing too, so this also
  covers create, update and operator restarts);
* every watch event of a pod labelled `chaos.training.dev/job` (reconciles its job);
* a resync loop every `resync_s` that also scrapes the members' `/metrics` (step, last
  scale-out delay) and runs the autoscaler (`chaos_operator.autoscaler`) on its jobs.

No finalizer: kopf timers and daemons would add one (deleting a job would hang while the
operator is down). Deletion is left to owner references and the garbage collector.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import kopf
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from chaos_operator.api import GROUP, VERSION, ChaosJob
from chaos_operator.autoscaler import Autoscaler
from chaos_operator.federation.rules import PublishedJob
from chaos_operator.metrics import OperatorMetrics
from chaos_operator.pods import ANN_NEXT_MEMBER, LABEL_JOB, Options
from chaos_operator.reconcile import ObservedPod, PodPlan, reconcile, running_members
from chaos_operator.scrape import latest_step, scale_out_delay, scrape_members

PLURAL = "chaosjobs"
FIELD_MANAGER = "chaos-operator"
log = logging.getLogger("chaos_operator")
registry = kopf.OperatorRegistry()


@dataclass
class Context:
    """What the handlers share (passed to kopf as `memo`)."""

    api: client.ApiClient
    options: Options = field(default_factory=Options)
    namespaces: tuple[str, ...] = ()
    """Watched namespaces; empty: all."""
    resync_s: float = 10.0
    scrape_timeout_s: float = 1.0
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)
    autoscaler: Autoscaler | None = None
    federation: Any = None
    """The `FederationService` when the operator federates (`--federation-listen`), else None."""
    _locks: dict[tuple[str, str], threading.Lock] = field(default_factory=dict)
    _guard: threading.Lock = field(default_factory=threading.Lock)

    def lock(self, namespace: str, name: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault((namespace, name), threading.Lock())


# ----------------------------------------------------------------------- observing


def observe_pod(pod: client.V1Pod) -> ObservedPod:
    """The reconcile's view of one pod."""
    meta, status = pod.metadata, pod.status
    conditions = (status and status.conditions) or ()
    return ObservedPod(
        name=meta.name,
        phase=(status and status.phase) or "Pending",
        labels=dict(meta.labels or {}),
        annotations=dict(meta.annotations or {}),
        ready=any(c.type == "Ready" and c.status == "True" for c in conditions),
        deleting=meta.deletion_timestamp is not None,
        ip=(status and status.pod_ip) or None,
        unschedulable=any(
            c.type == "PodScheduled" and c.status == "False" and c.reason == "Unschedulable"
            for c in conditions
        ),
    )


def local_job(job: ChaosJob, pods: list[ObservedPod], plan: PodPlan) -> PublishedJob:
    """What the federation tells other parties about one job: its running members, and how
    many more are starting (live or just created)."""
    members = running_members(pods)
    return PublishedJob(
        namespace=job.metadata.namespace or "default",
        name=job.metadata.name or "",
        federation=job.spec.federation,
        members=members,
        replicas=job.spec.replicas,
        starting=max(0, int(plan.status.get("replicas", 0)) - len(members)),
    )


# ------------------------------------------------------------------------- applying


def _ignore(status: int, call: Any, *args: Any, **kwargs: Any) -> bool:
    """Run `call`; False when it failed with HTTP `status` (409 exists, 404 gone)."""
    try:
        call(*args, **kwargs)
    except ApiException as exc:
        if exc.status == status:
            return False
        raise
    return True


def post_event(core: client.CoreV1Api, body: dict[str, Any], reason: str, message: str,
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


def reconcile_job(
    ctx: Context, namespace: str, name: str, *, scrape: bool = False
) -> PodPlan | None:
    """Observe job `namespace/name` and its pods, reconcile, apply. None if the job is gone."""
    custom = client.CustomObjectsApi(ctx.api)
    core = client.CoreV1Api(ctx.api)
    with ctx.lock(namespace, name):
        try:
            body = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                if ctx.federation:
                    ctx.federation.forget(namespace, name)
                return None
            raise
        meta = body["metadata"]
        if meta.get("deletionTimestamp"):
            if ctx.federation:
                ctx.federation.forget(namespace, name)
            return None  # the garbage collector takes the pods
        job = ChaosJob.model_validate(body)
        listed = core.list_namespaced_pod(namespace, label_selector=f"{LABEL_JOB}={name}").items
        # Only pods this very job owns (a job re-created under the same name has a new uid).
        owned = [
            p
            for p in listed
            if any(ref.uid == meta["uid"] for ref in p.metadata.owner_references or ())
        ]
        observed = [observe_pod(p) for p in owned]
        scrapes = scrape_members(observed, ctx.scrape_timeout_s) if scrape else {}
        newest_first = [p.name for p in sorted(observed, key=lambda p: -p.ordinal)]
        now = datetime.now(UTC)
        view = ctx.federation.view(namespace, job.spec.federation, name) if ctx.federation else None
        plan = reconcile(
            job,
            observed,
            now=now,
            current_step=latest_step(scrapes.values()),
            scale_out_delay_s=scale_out_delay(scrapes, newest_first),
            options=ctx.options,
            federation=view,
        )
        if ctx.federation:
            ctx.federation.publish(local_job(job, observed, plan))
        # The autoscaler changes spec.replicas (scale subresource); the next reconcile acts.
        scaling = (
            ctx.autoscaler.run(job, observed, scrapes, plan.status, now)
            if scrape and ctx.autoscaler
            else None
        )
        if scaling:
            plan = replace(plan, status=scaling.merged(plan.status, job.metadata.generation, now))
        if scaling and scaling.event:
            event = scaling.event
            post_event(core, body, event.reason, event.message, event.type)
        # Remember the ids handed out before any pod carries them, so none is ever reused.
        if str(plan.next_member) != (meta.get("annotations") or {}).get(ANN_NEXT_MEMBER):
            patch = {"metadata": {"annotations": {ANN_NEXT_MEMBER: str(plan.next_member)}}}
            custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, patch)
        if plan.create or plan.delete:
            log.info("%s/%s: %s", namespace, name, describe(plan))
        _ignore(409, core.create_namespaced_service, namespace, plan.service)
        for pod in plan.create:
            pod_name = pod["metadata"]["name"]
            if _ignore(409, core.create_namespaced_pod, namespace, pod):
                ctx.metrics.pods_created.inc()
                event = plan.events[pod_name]
                post_event(core, body, event.reason, event.message, event.type)
        for pod_name in plan.delete:
            if _ignore(404, core.delete_namespaced_pod, pod_name, namespace):
                ctx.metrics.pods_deleted.inc()
                event = plan.events[pod_name]
                post_event(core, body, event.reason, event.message, event.type)
        if plan.status != (job.status.to_k8s() if job.status else {}):
            try:
                custom.patch_namespaced_custom_object_status(
                    GROUP, VERSION, namespace, PLURAL, name, {"status": plan.status}
                )
            except ApiException as exc:
                if exc.status != 404:
                    raise
        return plan


# --------------------------------------------------------------------------- handlers


@kopf.on.login(registry=registry)
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """The same credentials as the `kubernetes` client: in-cluster, else kubeconfig."""
    return kopf.login_via_client(**kwargs)


@kopf.on.startup(registry=registry)
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    """Our own annotation prefix and finalizer name; Events only for warnings."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 60


@kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
def on_job_event(
    type: str | None, name: str, namespace: str, memo: Any, logger: logging.Logger, **_: Any
) -> None:
    """Any change of a ChaosJob (and the initial listing): reconcile it."""
    if type == "DELETED":
        if memo.ctx.federation:
            memo.ctx.federation.forget(namespace, name)
        return
    _run(memo.ctx, namespace, name, logger)


@kopf.on.event("", "v1", "pods", labels={LABEL_JOB: kopf.PRESENT}, registry=registry)
def on_pod_event(labels: dict[str, str], namespace: str, memo: Any,
                 logger: logging.Logger, **_: Any) -> None:  # fmt: skip
    """A worker pod changed (started, ended, deleted): reconcile its job."""
    _run(memo.ctx, namespace, labels[LABEL_JOB], logger)


@kopf.on.probe(id="jobs", registry=registry)
def probe_jobs(memo: Any, **_: Any) -> int:
    """Liveness detail: how many jobs the resync loop last saw."""
    return int(getattr(memo, "jobs_seen", 0))


@kopf.on.startup(registry=registry)
async def start_resync(memo: Any, **_: Any) -> None:
    """Start the periodic resync (level-based safety net and step scraping)."""
    memo.resync_task = asyncio.get_running_loop().create_task(_resync(memo))


@kopf.on.cleanup(registry=registry)
async def stop_resync(memo: Any, **_: Any) -> None:
    task = getattr(memo, "resync_task", None)
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def measured_reconcile(ctx: Context, namespace: str, name: str, *, scrape: bool = False) -> None:
    """`reconcile_job`, timed and counted in the operator's metrics."""
    with ctx.metrics.reconciling(namespace, name) as rec:
        plan = reconcile_job(ctx, namespace, name, scrape=scrape)
        rec.gone = plan is None
        if plan is not None:
            ctx.metrics.observe_phase(namespace, name, plan.status.get("phase"))


def _run(ctx: Context, namespace: str, name: str, logger: logging.Logger) -> None:
    try:
        measured_reconcile(ctx, namespace, name)
    except ApiException as exc:
        if exc.status == 409:  # a concurrent write; the next event or resync retries
            logger.info("conflict while reconciling %s/%s; will retry", namespace, name)
            return
        raise kopf.TemporaryError(f"API error {exc.status}: {exc.reason}", delay=2) from exc


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


def _list_jobs(ctx: Context) -> list[tuple[str, str]]:
    items = list_objects(ctx.api, ctx.namespaces, PLURAL)
    return [(i["metadata"]["namespace"], i["metadata"]["name"]) for i in items]


async def _resync(memo: Any) -> None:
    ctx: Context = memo.ctx
    while True:
        await asyncio.sleep(ctx.resync_s)
        try:
            jobs = await asyncio.to_thread(_list_jobs, ctx)
            memo.jobs_seen = len(jobs)
            ctx.metrics.keep_jobs(jobs)
            for namespace, name in jobs:
                await asyncio.to_thread(measured_reconcile, ctx, namespace, name, scrape=True)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # keep resyncing whatever one round met
            log.warning("resync failed: %s", exc)


def describe(plan: PodPlan) -> str:
    """A one-line summary of a plan (for logs)."""
    return json.dumps(
        {
            "create": [p["metadata"]["name"] for p in plan.create],
            "delete": plan.delete,
            "phase": plan.status.get("phase"),
        }
    )
