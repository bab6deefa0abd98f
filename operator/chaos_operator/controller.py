"""The operator's controller: observe a ChaosJob, decide, apply, on any `PodBackend`.

`JobController.sync(namespace, name)` is one reconcile of one job (one at a time per job):

* `_observe`: the job, the pods it owns, on a resync (and when a member ended while others
  live) its members' `/metrics` (`scrape.scrape_members`), and what it sees of the federation;
* `_decide`: the pure `reconcile.reconcile`, published to the federation, then on a resync the
  autoscaler, whose result is merged into a new status (the reconcile's plan is not changed);
* `_apply`: `apply_plan` (the `next-member` annotation, the Service and the checkpoint
  claim, pod creates and deletes with their Events, the status) and the pod counters; then,
  with worker TLS, the identity Secrets of the pods observed
  (`identities.WorkerIdentities.ensure`; a pod created now gets its own at the sync its
  creation triggers).

`apply_plan` is the one plan-apply loop: `chaos run FILE` applies its plans with it too, on
local processes (`chaos_cli.local.reconciled.LocalPods`). The backend on Kubernetes is
`kube.KubePods`.

Triggers: the kopf handlers (`handlers.py`) call `handle_event` for every watch event of a job
or of one of its pods; the resync loop (`start_resync`) reconciles every job every `resync_s`,
with scraping and autoscaling; the federation calls `sync_later` when a job's view changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from kubernetes.client.exceptions import ApiException

from chaos_operator.api import ChaosJob
from chaos_operator.autoscaler import Autoscaler
from chaos_operator.federation.rules import FederationView, PublishedJob, job_terms
from chaos_operator.metrics import OperatorMetrics
from chaos_operator.pods import ANN_NEXT_MEMBER, Options
from chaos_operator.reconcile import ObservedPod, PodEvent, PodPlan, reconcile, running_members
from chaos_operator.scrape import (
    MemberMetrics,
    durable_reading,
    latest_step,
    scale_out_delay,
    scrape_members,
)

if TYPE_CHECKING:
    from chaos_operator.federation.service import FederationService
    from chaos_operator.identities import WorkerIdentities

log = logging.getLogger("chaos_operator")
JobKey = tuple[str, str]


class PodBackend(Protocol):
    """Where ChaosJobs and their pods live, as the controller reads and changes them."""

    def list_jobs(self) -> list[JobKey]:
        """(namespace, name) of every job to resync."""
        ...

    def get_job(self, namespace: str, name: str) -> ChaosJob | None:
        """The job as stored now; None when it is gone or being deleted."""
        ...

    def observe(self, job: ChaosJob) -> list[ObservedPod]:
        """The pods this very job owns."""
        ...

    def set_next_member(self, job: ChaosJob, ordinal: int) -> None:
        """Remember the next unused member ordinal on the job."""
        ...

    def ensure_service(self, job: ChaosJob, body: dict[str, Any]) -> None:
        """Create the job's Service unless it exists."""
        ...

    def create(self, job: ChaosJob, body: dict[str, Any]) -> bool:
        """Create a pod of the job; False when it existed already."""
        ...

    def ensure_claim(self, job: ChaosJob, body: dict[str, Any]) -> None:
        """Create the job's checkpoint claim unless it exists."""
        ...

    def delete(self, job: ChaosJob, name: str) -> bool:
        """Delete a pod of the job; False when it was gone already."""
        ...

    def activate(self, job: ChaosJob, name: str, patch: dict[str, Any]) -> bool:
        """Patch a spare pod of the job (its role label and config annotation) so that it
        joins as a member; False when it was gone already."""
        ...

    def post_event(self, job: ChaosJob, event: PodEvent) -> None:
        """Tell the job's watchers (best effort)."""
        ...

    def patch_status(self, job: ChaosJob, status: dict[str, Any]) -> None:
        """Write the job's whole status."""
        ...

    def delete_job(self, job: ChaosJob) -> None:
        """Delete the ChaosJob itself (its TTL after finishing ran out); gone is fine."""
        ...


@dataclass(frozen=True)
class Applied:
    """The pods `apply_plan` created, deleted and made members (a 409 or 404 is not
    counted)."""

    created: list[str]
    deleted: list[str]
    activated: list[str] = field(default_factory=list)


def apply_plan(job: ChaosJob, plan: PodPlan, backend: PodBackend) -> Applied:
    """Carry out `plan` for `job` (as read before the reconcile) on `backend`.

    The next ordinal is remembered before any pod carries it, so no id is ever reused; spares
    are made members first (their join is the urgent part); an Event is posted only for a
    create, delete or activation that happened, so a repeated plan posts nothing; the status
    is written only when it changed, and the job's own Events (a phase transition) after it;
    a job whose TTL ran out is deleted last.
    """
    if str(plan.next_member) != job.metadata.annotations.get(ANN_NEXT_MEMBER):
        backend.set_next_member(job, plan.next_member)
    backend.ensure_service(job, plan.service)
    if plan.claim is not None:
        backend.ensure_claim(job, plan.claim)
    applied = Applied([], [], [])
    for name, patch in plan.activate.items():
        if backend.activate(job, name, patch):
            applied.activated.append(name)
            _post(backend, job, plan.events.get(name))
    for pod in plan.create:
        name = pod["metadata"]["name"]
        if backend.create(job, pod):
            applied.created.append(name)
            _post(backend, job, plan.events.get(name))
    for name in plan.delete:
        if backend.delete(job, name):
            applied.deleted.append(name)
            _post(backend, job, plan.events.get(name))
    if plan.status != (job.status.to_k8s() if job.status else {}):
        backend.patch_status(job, plan.status)
    for event in plan.job_events:
        backend.post_event(job, event)
    if plan.delete_job:
        backend.delete_job(job)
    return applied


def _post(backend: PodBackend, job: ChaosJob, event: PodEvent | None) -> None:
    if event is not None:
        backend.post_event(job, event)


def published_job(job: ChaosJob, pods: list[ObservedPod], plan: PodPlan) -> PublishedJob:
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
        terms=job_terms(job, plan.status.get("steps")),
    )


def describe(plan: PodPlan) -> str:
    """A one-line summary of a plan (for logs)."""
    return json.dumps(
        {
            "create": [p["metadata"]["name"] for p in plan.create],
            "delete": plan.delete,
            "activate": list(plan.activate),
            "phase": plan.status.get("phase"),
        }
    )


@dataclass
class Context:
    """Operator-wide settings and the collaborators every sync shares."""

    options: Options = field(default_factory=Options)
    resync_s: float = 10.0
    scrape_timeout_s: float = 1.0
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)
    autoscaler: Autoscaler | None = None
    """Runs on every resync of a job; None: no autoscaling."""
    federation: FederationService | None = None
    """Set when the operator federates (`--federation-listen`)."""
    identities: WorkerIdentities | None = None
    """Issues the worker pods' certificates (`Options.worker_tls`); None: no worker TLS."""


@dataclass(frozen=True)
class JobObservation:
    """What `_observe` saw of one job."""

    job: ChaosJob
    pods: list[ObservedPod]
    scrapes: dict[str, MemberMetrics]
    view: FederationView | None
    now: datetime
    resync: bool
    """Members were scraped; the autoscaler runs."""


@dataclass(frozen=True)
class Decision:
    """The plan to apply (the autoscaler's status merged in) and the autoscaler's Event."""

    plan: PodPlan
    scaled: PodEvent | None = None


def _utcnow() -> datetime:
    return datetime.now(UTC)


class JobController:
    """Reconciles ChaosJobs on `backend` (see the module docstring)."""

    def __init__(
        self, ctx: Context, backend: PodBackend, *, clock: Callable[[], datetime] = _utcnow
    ) -> None:
        self.ctx = ctx
        self.backend = backend
        self.clock = clock
        self.jobs_seen = 0
        """How many jobs the last resync listed (the liveness probe's detail)."""
        self._locks: dict[JobKey, threading.Lock] = {}
        self._guard = threading.Lock()
        self._resync_task: asyncio.Task[None] | None = None

    def _lock(self, namespace: str, name: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault((namespace, name), threading.Lock())

    # ---------------------------------------------------------------------- one sync

    def sync(self, namespace: str, name: str, *, resync: bool = False) -> PodPlan | None:
        """Observe job `namespace/name`, decide, apply; the plan applied, None if the job is
        gone. `resync`: also scrape the members and run the autoscaler."""
        with self._lock(namespace, name):
            seen = self._observe(namespace, name, resync=resync)
            if seen is None:
                if self.ctx.federation:
                    self.ctx.federation.forget(namespace, name)
                if self.ctx.identities:
                    self.ctx.identities.forget(namespace, name)
                return None
            decision = self._decide(seen)
            self._apply(seen, decision)
            return decision.plan

    def _observe(self, namespace: str, name: str, *, resync: bool) -> JobObservation | None:
        job = self.backend.get_job(namespace, name)
        if job is None:
            return None
        pods = self.backend.observe(job)
        members = [p for p in pods if not p.spare]  # a spare in standby trains nothing
        # A member that ended may have finished the last step: ask the others (who linger a
        # heartbeat or more after it) before deciding it is lost.
        ended = any(not p.live and not p.deleting for p in members)
        scrape = resync or (ended and any(p.live for p in members))
        scrapes = scrape_members(members, self.ctx.scrape_timeout_s) if scrape else {}
        fed = self.ctx.federation
        view = fed.view(namespace, job.spec.federation, name) if fed else None
        return JobObservation(job, pods, scrapes, view, self.clock(), resync)

    def _decide(self, seen: JobObservation) -> Decision:
        job, pods, scrapes, now = seen.job, seen.pods, seen.scrapes, seen.now
        members = [p for p in pods if not p.spare]
        newest_first = [p.name for p in sorted(members, key=lambda p: -p.ordinal)]
        plan = reconcile(
            job,
            pods,
            now=now,
            current_step=latest_step(scrapes.values()),
            scale_out_delay_s=scale_out_delay(scrapes, newest_first),
            options=self.ctx.options,
            federation=seen.view,
            durable=durable_reading(scrapes.values()),
        )
        if self.ctx.federation:
            self.ctx.federation.publish(published_job(job, pods, plan))
        autoscaler = self.ctx.autoscaler
        # The autoscaler changes spec.replicas (scale subresource); the next reconcile acts.
        # A suspended or finished job has no pods to measure: it is left alone.
        stopped = plan.status.get("phase") in ("Suspended", "Succeeded", "Failed")
        if not seen.resync or autoscaler is None or stopped:
            return Decision(plan)
        scaling = autoscaler.run(job, members, scrapes, plan.status, now)
        if scaling is None:
            return Decision(plan)
        status = scaling.merged(plan.status, job.metadata.generation, now)
        return Decision(replace(plan, status=status), scaling.event)

    def _apply(self, seen: JobObservation, decision: Decision) -> None:
        job, plan = seen.job, decision.plan
        if decision.scaled is not None:
            self.backend.post_event(job, decision.scaled)
        if plan.create or plan.delete or plan.activate:
            log.info("%s/%s: %s", job.metadata.namespace, job.metadata.name, describe(plan))
        applied = apply_plan(job, plan, self.backend)
        self.ctx.metrics.pods_created.inc(len(applied.created))
        self.ctx.metrics.pods_deleted.inc(len(applied.deleted))
        if self.ctx.identities:
            gone = set(applied.deleted)
            self.ctx.identities.ensure(job, [p for p in seen.pods if p.name not in gone], seen.now)

    def measured_sync(self, namespace: str, name: str, *, resync: bool = False) -> None:
        """`sync`, timed and counted in the operator's metrics."""
        with self.ctx.metrics.reconciling(namespace, name) as rec:
            plan = self.sync(namespace, name, resync=resync)
            rec.gone = plan is None
            if plan is not None:
                self.ctx.metrics.observe_phase(namespace, name, plan.status.get("phase"))

    # ---------------------------------------------------------------------- triggers

    def handle_event(
        self, namespace: str, name: str, logger: logging.Logger, *, deleted: bool = False
    ) -> None:
        """A watch event of job `namespace/name` or of one of its pods: reconcile the job (a
        deleted one is only forgotten by the federation). A conflict is left to the next event
        or resync; other API errors become kopf's TemporaryError."""
        if deleted:
            if self.ctx.federation:
                self.ctx.federation.forget(namespace, name)
            return
        try:
            self.measured_sync(namespace, name)
        except ApiException as exc:
            if exc.status == 409:  # a concurrent write; the next event or resync retries
                logger.info("conflict while reconciling %s/%s; will retry", namespace, name)
                return
            import kopf  # here, not at the top: `chaos run FILE` uses this module without kopf

            raise kopf.TemporaryError(f"API error {exc.status}: {exc.reason}", delay=2) from exc

    async def sync_later(self, namespace: str, name: str) -> None:
        """`sync` off the event loop (the federation's `on_change`)."""
        await asyncio.to_thread(self.sync, namespace, name)

    def start_resync(self) -> None:
        """Start the periodic resync on the running loop (level-based safety net, scraping
        and autoscaling)."""
        self._resync_task = asyncio.get_running_loop().create_task(self._resync())

    async def stop_resync(self) -> None:
        if self._resync_task is not None:
            self._resync_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._resync_task

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(self.ctx.resync_s)
            try:
                jobs = await asyncio.to_thread(self.backend.list_jobs)
                self.jobs_seen = len(jobs)
                self.ctx.metrics.keep_jobs(jobs)
                for namespace, name in jobs:
                    await asyncio.to_thread(self.measured_sync, namespace, name, resync=True)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep resyncing whatever one round met
                log.warning("resync failed: %s", exc)
