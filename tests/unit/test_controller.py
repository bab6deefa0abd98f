"""`JobController` (observe → decide → apply) against a fake, in-memory `PodBackend`.

The fake is a deliberate stand-in for the API server, fit for the unit tier: it stores jobs
as the API returns them (a fresh object per read), pods as bodies whose phase the test sets,
and records every write in order. The Kubernetes backend itself (`kube.KubePods`) is tested
against a real kube-apiserver in `tests/controlplane`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from copy import deepcopy
from datetime import datetime, timedelta
from typing import Any

import kopf
import pytest
from chaos_operator import controller as controller_module
from chaos_operator.api import ChaosJob
from chaos_operator.autoscaler import CONDITION, Autoscaler, Scaling
from chaos_operator.controller import Context, JobController, PodBackend
from chaos_operator.metrics import OperatorMetrics
from chaos_operator.pods import ANN_NEXT_MEMBER, LABEL_JOB, LABEL_ROLE, ROLE_MEMBER, Options
from chaos_operator.reconcile import ObservedPod, PodEvent, PodPlan
from chaos_operator.scrape import MemberMetrics
from kubernetes.client.exceptions import ApiException

from tests.unit.test_reconcile import NOW, make_job

pytestmark = pytest.mark.unit

NS, NAME = "ns", "digits"
LOG = logging.getLogger("test_controller")


class FakePods(PodBackend):
    """An in-memory PodBackend: jobs and pods as stored bodies, every write recorded."""

    def __init__(self, *jobs: ChaosJob) -> None:
        self.jobs = {(j.metadata.namespace, j.metadata.name): j.to_k8s() for j in jobs}
        self.pods: dict[str, dict[str, Any]] = {}
        self.phases: dict[str, str] = {}
        self.writes: list[tuple[str, str]] = []
        self.events: list[PodEvent] = []
        self.statuses: list[dict[str, Any]] = []
        self.exists: set[str] = set()
        """Pods whose create finds them there already (the API's 409)."""
        self.fail_create: ApiException | None = None

    def list_jobs(self) -> list[tuple[str, str]]:
        return list(self.jobs)

    def get_job(self, namespace: str, name: str) -> ChaosJob | None:
        body = self.jobs.get((namespace, name))
        return None if body is None else ChaosJob.model_validate(deepcopy(body))

    def observe(self, job: ChaosJob) -> list[ObservedPod]:
        return [
            ObservedPod(
                name=name,
                phase=self.phases[name],
                labels=body["metadata"]["labels"],
                annotations=body["metadata"]["annotations"],
                ready=self.phases[name] == "Running",
            )
            for name, body in self.pods.items()
            if body["metadata"]["labels"][LABEL_JOB] == job.metadata.name
        ]

    def _body(self, job: ChaosJob) -> dict[str, Any]:
        return self.jobs[(job.metadata.namespace, job.metadata.name)]

    def set_next_member(self, job: ChaosJob, ordinal: int) -> None:
        self.writes.append(("next-member", str(ordinal)))
        self._body(job)["metadata"].setdefault("annotations", {})[ANN_NEXT_MEMBER] = str(ordinal)

    def ensure_service(self, job: ChaosJob, body: dict[str, Any]) -> None:
        self.writes.append(("service", body["metadata"]["name"]))

    def create(self, job: ChaosJob, body: dict[str, Any]) -> bool:
        if self.fail_create is not None:
            raise self.fail_create
        name = body["metadata"]["name"]
        if name in self.exists:
            return False
        self.writes.append(("create", name))
        self.pods[name], self.phases[name] = body, "Pending"
        return True

    def delete(self, job: ChaosJob, name: str) -> bool:
        if self.pods.pop(name, None) is None:
            return False
        self.writes.append(("delete", name))
        return True

    def activate(self, job: ChaosJob, name: str, patch: dict[str, Any]) -> bool:
        if name not in self.pods:
            return False
        self.writes.append(("activate", name))
        meta = self.pods[name]["metadata"]
        for key in ("labels", "annotations"):
            meta[key] = {**meta[key], **patch["metadata"].get(key, {})}
        return True

    def post_event(self, job: ChaosJob, event: PodEvent) -> None:
        self.writes.append(("event", event.reason))
        self.events.append(event)

    def patch_status(self, job: ChaosJob, status: dict[str, Any]) -> None:
        self.writes.append(("status", status["phase"]))
        self.statuses.append(deepcopy(status))
        self._body(job)["status"] = deepcopy(status)

    # what the kubelet and the user do
    def run_all(self) -> None:
        for name in self.pods:
            self.phases[name] = "Running"

    def scale(self, replicas: int) -> None:
        spec, meta = self.jobs[(NS, NAME)]["spec"], self.jobs[(NS, NAME)]["metadata"]
        spec["replicas"], meta["generation"] = replicas, meta["generation"] + 1


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


def controller_for(pods: FakePods, **ctx: Any) -> JobController:
    return JobController(Context(options=Options(steps=100), **ctx), pods, clock=Clock())


def counted(c: JobController, name: str, **labels: str) -> float | None:
    return c.ctx.metrics.registry.get_sample_value(name, labels)


def test_a_new_job_gets_its_members_and_the_next_ordinal_before_any_pod() -> None:
    pods = FakePods(make_job(3))
    c = controller_for(pods)
    plan = c.sync(NS, NAME)
    assert plan is not None
    members = ["digits-w0", "digits-w1", "digits-w2"]
    assert pods.writes[:2] == [("next-member", "3"), ("service", "digits-workers")]
    assert pods.writes[2:] == [
        *(w for m in members for w in (("create", m), ("event", "MemberAdded"))),
        ("status", "Pending"),
    ]
    assert sorted(pods.pods) == members
    stored = pods.get_job(NS, NAME)
    assert stored is not None and stored.status is not None
    assert stored.metadata.annotations[ANN_NEXT_MEMBER] == "3"
    assert stored.status.replicas == 3
    assert counted(c, "chaos_operator_pods_created_total") == 3


def test_a_repeated_sync_writes_nothing_new() -> None:
    pods = FakePods(make_job(3))
    c = controller_for(pods)
    c.sync(NS, NAME)
    before = list(pods.writes)
    c.sync(NS, NAME)
    assert pods.writes == [*before, ("service", "digits-workers")]  # ensured, nothing else


def test_surplus_members_are_deleted_and_ended_ones_replaced() -> None:
    pods = FakePods(make_job(3))
    c = controller_for(pods)
    c.sync(NS, NAME)
    pods.run_all()
    c.sync(NS, NAME)
    assert pods.statuses[-1]["phase"] == "Running"
    pods.scale(2)
    c.sync(NS, NAME)  # w2, the newest, goes
    assert pods.writes[-3:] == [
        ("delete", "digits-w2"),
        ("event", "MemberRemoved"),
        ("status", "Running"),
    ]
    pods.phases["digits-w0"] = "Failed"
    c.sync(NS, NAME)  # w0 ended: deleted, and w3 replaces it, joining through w1
    assert pods.writes[-5:] == [
        ("create", "digits-w3"),
        ("event", "MemberAdded"),
        ("delete", "digits-w0"),
        ("event", "MemberLost"),
        ("status", "Recovering"),
    ]
    assert "joins through digits-w1" in pods.events[-2].message
    assert pods.events[-1].type == "Warning"
    assert sorted(pods.pods) == ["digits-w1", "digits-w3"]
    assert counted(c, "chaos_operator_pods_deleted_total") == 2
    assert counted(c, "chaos_operator_pods_created_total") == 4


def test_a_spare_is_made_a_member_by_a_patch_and_its_loss_posts_nothing() -> None:
    job = make_job(2)
    pods = FakePods(job.model_copy(update={"spec": job.spec.model_copy(update={"spares": 1})}))
    c = controller_for(pods)
    c.sync(NS, NAME)
    pods.run_all()
    c.sync(NS, NAME)
    assert pods.statuses[-1]["spares"] == "1/1" and pods.statuses[-1]["replicas"] == 2
    pods.phases["digits-w1"] = "Failed"
    c.sync(NS, NAME)  # the spare w2 replaces w1 (first of all), w3 is the new spare
    assert pods.writes[-7:] == [
        ("activate", "digits-w2"),
        ("event", "MemberAdded"),
        ("create", "digits-w3"),
        ("event", "SpareAdded"),
        ("delete", "digits-w1"),
        ("event", "MemberLost"),
        ("status", "Recovering"),
    ]
    assert pods.pods["digits-w2"]["metadata"]["labels"][LABEL_ROLE] == ROLE_MEMBER
    pods.run_all()
    c.sync(NS, NAME)
    before = len(pods.events)
    pods.phases["digits-w3"] = "Failed"  # the new spare dies: replaced, no member Event
    c.sync(NS, NAME)
    assert [e.reason for e in pods.events[before:]] == ["SpareAdded"]
    assert ("delete", "digits-w3") in pods.writes and "digits-w4" in pods.pods
    assert pods.statuses[-1]["phase"] == "Running"


def test_a_create_or_delete_that_did_not_happen_posts_no_event() -> None:
    pods = FakePods(make_job(2))
    pods.exists = {"digits-w1"}  # created meanwhile by someone else: 409
    c = controller_for(pods)
    c.sync(NS, NAME)
    assert [e.message for e in pods.events] == ["member digits-w0 starts the initial set of 2"]
    assert counted(c, "chaos_operator_pods_created_total") == 1


def test_a_gone_job_is_forgotten_by_the_federation_and_counted_gone() -> None:
    forgotten = []

    class Federation:
        def forget(self, namespace: str, name: str) -> None:
            forgotten.append((namespace, name))

    c = controller_for(FakePods(), federation=Federation())
    assert c.sync(NS, NAME) is None
    c.measured_sync(NS, NAME)
    assert forgotten == [(NS, NAME), (NS, NAME)]
    assert counted(c, "chaos_operator_reconcile_total", result="gone") == 1


class Identities:
    """Records what the controller asks of `WorkerIdentities`."""

    def __init__(self) -> None:
        self.ensured: list[list[str]] = []
        self.forgotten: list[tuple[str, str]] = []

    def ensure(self, job: ChaosJob, pods: list[ObservedPod], now: datetime) -> list[str]:
        self.ensured.append(sorted(p.name for p in pods))
        return []

    def forget(self, namespace: str, name: str) -> None:
        self.forgotten.append((namespace, name))


def test_identities_are_ensured_after_the_plan_for_the_pods_it_keeps() -> None:
    pods, identities = FakePods(make_job(2)), Identities()
    c = controller_for(pods, identities=identities)
    c.sync(NS, NAME)  # pods created now get theirs at the sync their creation triggers
    pods.run_all()
    c.sync(NS, NAME)
    pods.scale(1)
    c.sync(NS, NAME)  # w1 is deleted: no certificate for it
    assert identities.ensured == [[], ["digits-w0", "digits-w1"], ["digits-w0"]]
    pods.jobs.clear()
    assert c.sync(NS, NAME) is None
    assert identities.forgotten == [(NS, NAME)]


def test_the_autoscaler_is_merged_into_a_new_status_and_the_plan_is_left_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reconciled: list[PodPlan] = []
    real = controller_module.reconcile

    def recording(*args: Any, **kwargs: Any) -> PodPlan:
        plan = real(*args, **kwargs)
        reconciled.append(plan)
        return plan

    class Scaler:
        def __init__(self) -> None:
            self.seen: list[Mapping[str, Any]] = []

        def run(self, job: ChaosJob, pods: Any, scrapes: Mapping[str, MemberMetrics],
                status: Mapping[str, Any], now: datetime) -> Scaling:  # fmt: skip
            self.seen.append(status)
            return Scaling(
                block={"desiredReplicas": 3, "reason": "GoodputAboveTarget", "message": "m"},
                condition=("True", "GoodputAboveTarget", "m"),
                event=PodEvent("AutoscaleUp", "2 -> 3 replicas"),
            )

    monkeypatch.setattr(controller_module, "reconcile", recording)
    pods, scaler = FakePods(make_job(2)), Scaler()
    c = controller_for(pods, autoscaler=scaler)
    c.sync(NS, NAME)  # a watch event: no autoscaling
    assert scaler.seen == [] and "autoscaling" not in pods.statuses[-1]
    plan = c.sync(NS, NAME, resync=True)
    assert plan is not None
    (plain,) = reconciled[1:]
    assert scaler.seen == [plain.status]
    assert "autoscaling" not in plain.status
    assert CONDITION not in {k["type"] for k in plain.status["conditions"]}
    assert plan.status["autoscaling"]["reason"] == "GoodputAboveTarget"
    active = {k["type"]: k for k in plan.status["conditions"]}[CONDITION]
    assert (active["status"], active["reason"]) == ("True", "GoodputAboveTarget")
    others = [k for k in plan.status["conditions"] if k["type"] != CONDITION]
    assert others == plain.status["conditions"]
    assert {k: v for k, v in plan.status.items() if k not in ("autoscaling", "conditions")} == {
        k: v for k, v in plain.status.items() if k != "conditions"
    }
    assert pods.statuses[-1] == plan.status
    assert pods.writes[-3:] == [
        ("event", "AutoscaleUp"),  # first, as before the autoscaler returned its result
        ("service", "digits-workers"),
        ("status", "Pending"),
    ]


def test_a_disabled_autoscaler_retires_its_condition() -> None:
    status = {"phase": "Pending", "conditions": [{
        "type": CONDITION, "status": "True", "reason": "OnTarget", "message": "m",
        "lastTransitionTime": "2026-11-22T14:00:00Z"}]}  # fmt: skip
    pods = FakePods(make_job(1, status=status))
    # autoscaling is off in make_job's spec: the autoscaler reaches no API at all
    c = controller_for(pods, autoscaler=Autoscaler(api=None))
    c.sync(NS, NAME, resync=True)
    active = {k["type"]: k for k in pods.statuses[-1]["conditions"]}[CONDITION]
    assert (active["status"], active["reason"]) == ("False", "Disabled")
    assert "autoscaling" not in pods.statuses[-1]


def test_a_conflict_waits_for_the_next_event_and_other_errors_are_temporary() -> None:
    pods = FakePods(make_job(1))
    c = controller_for(pods, metrics=OperatorMetrics())
    pods.fail_create = ApiException(status=409)
    c.handle_event(NS, NAME, LOG)  # swallowed: the next event or resync retries
    assert counted(c, "chaos_operator_reconcile_total", result="conflict") == 1
    pods.fail_create = ApiException(status=500, reason="boom")
    with pytest.raises(kopf.TemporaryError, match="API error 500: boom"):
        c.handle_event(NS, NAME, LOG)
    assert counted(c, "chaos_operator_reconcile_total", result="error") == 1
    c.handle_event(NS, NAME, LOG, deleted=True)  # a deleted job is not read at all
    assert counted(c, "chaos_operator_reconcile_total", result="error") == 1
