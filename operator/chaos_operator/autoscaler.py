"""The autoscaler's edge: measure goodput, read capacity, ask the policy, scale the job.

The decision is `chaos_planner.autoscale.decide` (pure). This module gathers its input on
every resync of a job with `spec.autoscaling.enabled`:

* goodput: the sum of the running members' `rate(chaos_train_samples_total)` between this
  resync's scrape of their `/metrics` and the previous one (`scrape.measure_goodput`), or,
  with a Prometheus URL, an instant query (`PROMETHEUS_QUERY`) once the members have been
  unchanged for longer than its rate window. Each clean measurement is an `Observation` of the
  job's scaling curve, remembered in memory per job (an operator restart relearns it);
* capacity: the job's pods (pending, unschedulable) and the namespace's ResourceQuotas;
* the cooldown: `status.autoscaling.lastDecisionTime`.

A change goes through the job's scale subresource (as the HorizontalPodAutoscaler does), then
the reconcile adds or removes members. `Autoscaler.run` returns a `Scaling`: the decision for
`status.autoscaling`, the `AutoscalingActive` condition, and on a change a PodEvent
(`AutoscaleUp`/`AutoscaleDown`); the controller merges it into a new status (`Scaling.merged`).
"""

from __future__ import annotations

import json
import logging
import math
import string
import threading
import time
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal
from typing import Any

from chaos_planner.autoscale import AutoscaleInput, Observation, ScaleDecision, decide
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.utils import parse_quantity

from chaos_operator.api import GROUP, VERSION, ChaosJob
from chaos_operator.api.conditions import set_condition
from chaos_operator.kube import PLURAL
from chaos_operator.reconcile import ConditionState, ObservedPod, PodEvent
from chaos_operator.scrape import MemberMetrics, measure_goodput, view_settled

log = logging.getLogger("chaos_operator.autoscaler")

CONDITION = "AutoscalingActive"
#: Job goodput from Prometheus; `$namespace` and `$job` are substituted.
PROMETHEUS_QUERY = (
    'sum(rate(chaos_train_samples_total{namespace="$namespace",pod=~"$job-w[0-9]+"}[1m]))'
)
PROMETHEUS_SETTLE_S = 75.0
"""Members unchanged this long before a Prometheus figure counts: the 1m window and a scrape."""
HISTORY = 256
"""Observations remembered per job."""


def _time(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------ pure helpers


def pods_in_flux(pods: Iterable[ObservedPod]) -> tuple[bool, bool]:
    """(some pod is pending, some pod cannot be scheduled) among the job's live pods."""
    pending = unschedulable = False
    for pod in pods:
        if pod.deleting or pod.phase != "Pending":
            continue
        pending = True
        unschedulable |= pod.unschedulable
    return pending, unschedulable


def _per_pod(resource: str, requests: Mapping[str, Any], limits: Mapping[str, Any]) -> Decimal:
    """How much of quota `resource` one worker pod uses (0: it does not count)."""
    if resource in ("pods", "count/pods"):
        return Decimal(1)
    if resource.startswith("limits."):
        amount = limits.get(resource.removeprefix("limits."))
    elif resource.startswith("requests.") or resource in ("cpu", "memory", "ephemeral-storage"):
        name = resource.removeprefix("requests.")
        amount = requests.get(name, limits.get(name))  # requests default to the limits
    else:
        return Decimal(0)
    return Decimal(0) if amount is None else parse_quantity(str(amount))


def quota_headroom(
    quotas: Iterable[tuple[Mapping[str, str], Mapping[str, str]]],
    requests: Mapping[str, Any],
    limits: Mapping[str, Any],
) -> int | None:
    """How many more worker pods the quotas `(hard, used)` admit; None: none limits them.

    Counts `pods`, `count/pods`, `requests.*`/`limits.*` and the bare `cpu`, `memory`,
    `ephemeral-storage` against the trainer's resources (the replicator requests nothing).
    Quota scopes are ignored, which can only make the answer smaller.
    """
    best: int | None = None
    for hard, used in quotas:
        for resource, limit in hard.items():
            per_pod = _per_pod(resource, requests, limits)
            if per_pod <= 0:
                continue
            free = parse_quantity(limit) - parse_quantity(used.get(resource, "0"))
            fits = max(0, math.floor(free / per_pod))
            best = fits if best is None else min(best, fits)
    return best


def status_block(
    previous: Mapping[str, Any], decision: ScaleDecision, now: datetime, changed: bool
) -> dict[str, Any]:
    """`status.autoscaling` after `decision` (the decision time moves only when it `changed`)."""
    out: dict[str, Any] = {
        "desiredReplicas": decision.replicas,
        "reason": decision.reason,
        "message": decision.message[:1024],
    }
    last = _time(now) if changed else previous.get("lastDecisionTime")
    if last:
        out["lastDecisionTime"] = last
    if decision.goodput is not None:
        out["goodputSamplesPerSecond"] = round(decision.goodput, 3)
    if decision.marginal is not None:
        out["marginalGoodputSamplesPerSecond"] = round(decision.marginal, 3)
    return out


def condition_of(decision: ScaleDecision) -> ConditionState:
    """(status, reason, message) of the `AutoscalingActive` condition."""
    return (
        ("False" if decision.reason == "Measuring" else "True"),
        decision.reason,
        decision.message,
    )


# ---------------------------------------------------------------------------- I/O


def query_prometheus(base_url: str, promql: str, timeout_s: float) -> float | None:
    """The value of an instant query that returns one number; None if it returned none."""
    url = f"{base_url.rstrip('/')}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as reply:
            body = json.load(reply)
        data = body["data"]
        if body.get("status") != "success":
            return None
        if data["resultType"] == "scalar":
            values = [data["result"][1]]
        else:
            values = [r["value"][1] for r in data["result"]]
        value = float(values[0]) if len(values) == 1 else None
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        log.warning("prometheus query failed: %s", exc)
        return None
    return value if value is not None and math.isfinite(value) and value >= 0 else None


def read_quota_headroom(core: client.CoreV1Api, namespace: str, job: ChaosJob) -> int | None:
    """`quota_headroom` of the namespace's ResourceQuotas (None if none or not readable)."""
    try:
        items = core.list_namespaced_resource_quota(namespace).items
    except ApiException as exc:
        log.warning("resource quotas of %s not readable: %s", namespace, exc.reason)
        return None
    quotas = [
        (dict((q.status and q.status.hard) or (q.spec and q.spec.hard) or {}),
         dict((q.status and q.status.used) or {}))
        for q in items
    ]  # fmt: skip
    res = job.spec.resources
    return quota_headroom(quotas, res.requests, res.limits)


@dataclass(frozen=True)
class Scaling:
    """What one autoscaler run adds to the job's status, and the Event of a change."""

    block: dict[str, Any] | None = None
    """`status.autoscaling`."""
    condition: ConditionState | None = None
    """The `AutoscalingActive` condition."""
    event: PodEvent | None = None
    """Posted when the replicas were changed."""

    def merged(
        self, status: Mapping[str, Any], generation: int | None, now: datetime
    ) -> dict[str, Any]:
        """A new status: `status` with this run's block and condition in it (`status` is
        left as it is)."""
        out = dict(status)
        if self.block is not None:
            out["autoscaling"] = self.block
        if self.condition is not None:
            state, reason, message = self.condition
            conditions = status.get("conditions", [])
            out["conditions"] = set_condition(
                conditions, CONDITION, state, reason, message, generation, now
            )
        return out


@dataclass
class JobMemory:
    """What the autoscaler remembers of one job between resyncs."""

    uid: str
    scrapes: dict[str, MemberMetrics] = field(default_factory=dict)
    observations: deque[Observation] = field(default_factory=lambda: deque(maxlen=HISTORY))
    running: frozenset[str] = frozenset()
    running_since: float = 0.0


@dataclass
class Autoscaler:
    """Per-operator autoscaling state; `run` is called on every resync of a job."""

    api: client.ApiClient
    prometheus_url: str | None = None
    prometheus_query: str = PROMETHEUS_QUERY
    timeout_s: float = 5.0
    _jobs: dict[tuple[str, str], JobMemory] = field(default_factory=dict)
    _guard: threading.Lock = field(default_factory=threading.Lock)

    def memory(self, namespace: str, name: str, uid: str) -> JobMemory:
        with self._guard:
            mem = self._jobs.get((namespace, name))
            if mem is None or mem.uid != uid:  # a job re-created under the same name
                mem = self._jobs[(namespace, name)] = JobMemory(uid)
            return mem

    def measure(
        self,
        mem: JobMemory,
        namespace: str,
        name: str,
        running: frozenset[str],
        scrapes: Mapping[str, MemberMetrics],
    ) -> float | None:
        """The job's goodput now, if it can be measured cleanly."""
        mono = time.monotonic()
        if running != mem.running:
            mem.running, mem.running_since = running, mono
        before, mem.scrapes = mem.scrapes, dict(scrapes)
        if not self.prometheus_url:
            return measure_goodput(before, scrapes, running)
        settled = mono - mem.running_since >= PROMETHEUS_SETTLE_S and view_settled(
            [scrapes.get(n) for n in running], len(running)
        )
        if not running or not settled:
            return None
        promql = string.Template(self.prometheus_query).safe_substitute(
            namespace=namespace, job=name
        )
        return query_prometheus(self.prometheus_url, promql, self.timeout_s)

    def run(
        self,
        job: ChaosJob,
        pods: Sequence[ObservedPod],
        scrapes: Mapping[str, MemberMetrics],
        status: Mapping[str, Any],
        now: datetime,
    ) -> Scaling | None:
        """Measure, decide and scale `job`, whose reconciled status is `status` (read only).

        None: nothing to add to the status.
        """
        meta = job.metadata
        name, namespace = meta.name or "", meta.namespace or "default"
        policy, spec = job.spec.autoscaling, job.spec
        if not policy.enabled or policy.target_goodput_per_worker is None:
            with self._guard:
                self._jobs.pop((namespace, name), None)
            if any(c.get("type") == CONDITION for c in status.get("conditions", [])):
                return Scaling(condition=("False", "Disabled", "autoscaling is not enabled"))
            return None
        if status.get("phase") == "Succeeded":
            return None  # training is over; nothing to size
        mem = self.memory(namespace, name, str((meta.model_extra or {}).get("uid", "")))
        running = frozenset(p.name for p in pods if p.phase == "Running" and not p.deleting)
        goodput = self.measure(mem, namespace, name, running, scrapes)
        if goodput is not None:
            mem.observations.append(
                Observation(workers=len(running), samples_per_s=goodput, at=now.timestamp())
            )
        pending, unschedulable = pods_in_flux(pods)
        previous = job.status.autoscaling if job.status else None
        last = previous.last_decision_time if previous else None
        decision = decide(
            AutoscaleInput(
                min_replicas=spec.min_replicas,
                max_replicas=spec.max_replicas,
                replicas=spec.replicas,
                target_per_worker=policy.target_goodput_per_worker,
                now=now.timestamp(),
                cooldown_s=float(policy.cooldown_seconds),
                last_decision_at=last.timestamp() if last else None,
                observations=tuple(mem.observations),
                pods_pending=pending or len(running) != spec.replicas,
                unschedulable=unschedulable,
                quota_headroom=read_quota_headroom(client.CoreV1Api(self.api), namespace, job),
            )
        )
        changed = decision.replicas != spec.replicas
        if changed:
            try:
                client.CustomObjectsApi(self.api).patch_namespaced_custom_object_scale(
                    GROUP,
                    VERSION,
                    namespace,
                    PLURAL,
                    name,
                    {"spec": {"replicas": decision.replicas}},
                )
            except ApiException as exc:
                log.warning("%s/%s: scaling to %d failed: %s", namespace, name,
                            decision.replicas, exc.reason)  # fmt: skip
                message = f"{decision.message} (not applied: {exc.reason})"
                decision = decision.model_copy(update={"message": message})
                changed = False
        block = status_block(previous.to_k8s() if previous else {}, decision, now, changed)
        scaling = Scaling(block=block, condition=condition_of(decision))
        if not changed:
            return scaling
        log.info("%s/%s: %s -> %d replicas: %s", namespace, name, decision.reason,
                 decision.replicas, decision.message)  # fmt: skip
        up = decision.replicas > spec.replicas
        event = PodEvent("AutoscaleUp" if up else "AutoscaleDown",
                         f"{spec.replicas} -> {decision.replicas} replicas ({decision.reason}): "
                         f"{decision.message}")  # fmt: skip
        return replace(scaling, event=event)
