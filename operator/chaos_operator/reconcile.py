"""Pure reconcile of a `ChaosJob`: observed pods in, desired pods, deletions and status out.

No I/O and no clock: the caller passes `now` and what it observed, and applies the `PodPlan`
(the kopf handlers on Kubernetes). The same input always gives the same plan.

Rules:

* One pod per member; the member id is the pod name `<job>-w<ordinal>`. Ordinals only grow:
  the job's annotation `chaos.training.dev/next-member` remembers the next one, so an id is
  never reused (the data plane admits a returning id only as a newcomer if it is new).
* Keep `spec.replicas` live pods (Pending, Running or Unknown, not being deleted). A pod that
  ended (Failed, or Succeeded while the job goes on) is a lost member: it is deleted and a
  new member replaces it.
* New members join through a live member (`join: <seed address>`), the oldest running one.
  When no member is live (a new job, or every member lost), the new members form a fresh
  initial set: each starts with `members` = all of them.
* Scaling down deletes the newest members.
* Federation (when the operator has an identity and passes a `FederationView`): member ids
  carry the party (`<party>.<pod>`), so ids of different parties never clash. A party with no
  live member joins through a remote member (of the smallest party that admits it) instead of
  forming an initial set. With no member anywhere, the initial set is formed by the smallest
  party name among the parties that want workers and admit each other's; the others wait
  (`Ready` False, `WaitingForSeed`) until its members run. A remote party's `maxWorkers` caps
  how many workers this party runs while it trains with that party's members. Nothing is ever
  created or deleted for another party.
* The job is Succeeded once every pod it has ended with Succeeded (training reached its last
  step); then nothing is created any more. Once the current step is the last one
  (`options.steps`), members that end are not replaced either: they are finishing.

Addresses: every member gets a port from its ordinal (`base_port + 3 * (ordinal % 1000)`:
trainer, +1 metrics, +2 replicator) and a host: its DNS name under the job's headless
Service (`hostname`/`subdomain` are set on the pod), or a fixed `pod_host` (tests run every
pod on 127.0.0.1). Ports differ between members so that pods sharing one host do not clash.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from chaos_operator.api import API_VERSION, ChaosJob
from chaos_operator.api.conditions import set_condition

if TYPE_CHECKING:
    from chaos_operator.federation.rules import FederationView

LABEL_JOB = "chaos.training.dev/job"
LABEL_MEMBER = "chaos.training.dev/member"
ANN_ORDINAL = "chaos.training.dev/ordinal"
ANN_ADDRESS = "chaos.training.dev/address"
ANN_METRICS = "chaos.training.dev/metrics-port"
ANN_CONFIG = "chaos.training.dev/config"
ANN_NEXT_MEMBER = "chaos.training.dev/next-member"
COMMON_LABELS = {
    "app.kubernetes.io/managed-by": "chaos-operator",
    "app.kubernetes.io/part-of": "chaos",
    "app.kubernetes.io/component": "worker",
}
CONFIG_DIR = "/etc/chaos"
SNAPSHOT_DIR = "/snapshots"
LIVE_PHASES = frozenset({"Pending", "Running", "Unknown"})
PORTS_PER_MEMBER = 3
PORT_WRAP = 1000


@dataclass(frozen=True)
class Options:
    """How pods are addressed and how long workers train (operator-wide settings)."""

    base_port: int = 7070
    pod_host: str | None = None
    cluster_domain: str = "cluster.local"
    steps: int = 1_000_000_000
    heartbeat_interval_s: float = 0.25
    failure_timeout_s: float = 5.0
    party: str | None = None
    """This party's name when federation is on: member ids become `<party>.<pod name>`."""


@dataclass(frozen=True)
class ObservedPod:
    """What the reconcile needs to know about one existing pod of the job."""

    name: str
    phase: str = "Pending"
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    ready: bool = False
    deleting: bool = False

    @property
    def member(self) -> str:
        return self.labels.get(LABEL_MEMBER, self.name)

    @property
    def ordinal(self) -> int:
        """The member's ordinal (from the annotation, else the name's `-w<n>` suffix)."""
        raw = self.annotations.get(ANN_ORDINAL) or self.name.rpartition("-w")[2]
        try:
            return int(raw)
        except ValueError:
            return -1

    @property
    def live(self) -> bool:
        return not self.deleting and self.phase in LIVE_PHASES

    @property
    def running(self) -> bool:
        return self.live and self.phase == "Running"

    @property
    def address(self) -> str | None:
        return self.annotations.get(ANN_ADDRESS)


@dataclass(frozen=True)
class PodEvent:
    """A Kubernetes Event to post on the job once the action behind it is done."""

    reason: str
    message: str
    type: str = "Normal"


@dataclass(frozen=True)
class PodPlan:
    """What to do: create pods, delete pods, ensure the Service, write status."""

    create: list[dict[str, Any]]
    delete: list[str]
    service: dict[str, Any]
    status: dict[str, Any]
    next_member: int
    events: dict[str, PodEvent]
    """Keyed by the pod name whose creation or deletion the event reports."""


def service_name(job: str) -> str:
    return f"{job}-workers"


def selector(job: str) -> str:
    return f"{LABEL_JOB}={job}"


def member_name(job: str, ordinal: int) -> str:
    return f"{job}-w{ordinal}"


def member_id(job: str, ordinal: int, options: Options) -> str:
    """The data-plane id of a member: its pod name, qualified by the party when federated."""
    pod = member_name(job, ordinal)
    return f"{options.party}.{pod}" if options.party else pod


def running_members(pods: Sequence[ObservedPod]) -> dict[str, str]:
    """Running members that have an address: id -> trainer address (what peers are told)."""
    return {p.member: p.address for p in pods if p.running and p.address}


def member_address(job: str, namespace: str, ordinal: int, options: Options) -> str:
    """host:port of a member's trainer."""
    port = options.base_port + PORTS_PER_MEMBER * (ordinal % PORT_WRAP)
    if options.pod_host:
        host = options.pod_host
    else:
        host = (
            f"{member_name(job, ordinal)}.{service_name(job)}.{namespace}.svc."
            f"{options.cluster_domain}"
        )
    return f"{host}:{port}"


def _meta(job: ChaosJob) -> tuple[str, str, str]:
    extra = job.metadata.model_extra or {}
    return job.metadata.name or "", job.metadata.namespace or "default", str(extra.get("uid", ""))


def owner_reference(job: ChaosJob) -> dict[str, Any]:
    name, _, uid = _meta(job)
    return {
        "apiVersion": API_VERSION,
        "kind": "ChaosJob",
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def worker_config(
    job: ChaosJob,
    ordinal: int,
    options: Options,
    *,
    members: Mapping[str, str] | None = None,
    join: str | None = None,
) -> dict[str, Any]:
    """The `chaos worker` configuration of one member (`WorkerConfig` fields)."""
    name, namespace, _ = _meta(job)
    address = member_address(name, namespace, ordinal, options)
    port = int(address.rpartition(":")[2])
    config: dict[str, Any] = {
        "id": member_id(name, ordinal, options),
        "listen": address,
        "entry": job.spec.entry,
        "seed": job.spec.seed,
        "global_batch": job.spec.global_batch,
        "steps": options.steps,
        "heartbeat_interval_s": options.heartbeat_interval_s,
        "failure_timeout_s": options.failure_timeout_s,
        "metrics_port": port + 1,
        "snapshot_dir": SNAPSHOT_DIR,
        # the pod's `replicator` container serves the snapshots (see worker_pod)
        "replicator_address": f"{address.rpartition(':')[0]}:{port + 2}",
    }
    if members:
        config["members"] = dict(sorted(members.items()))
    else:
        config["join"] = join
    return config


def worker_pod(job: ChaosJob, ordinal: int, config: Mapping[str, Any]) -> dict[str, Any]:
    """The pod of one member: trainer and replicator sharing a memory-backed volume."""
    name, namespace, _ = _meta(job)
    pod_name = member_name(name, ordinal)
    member = str(config["id"])
    address = str(config["listen"])
    port = int(address.rpartition(":")[2])
    resources = {k: v for k, v in job.spec.resources.to_k8s().items() if v}
    snapshots = {"name": "snapshots", "mountPath": SNAPSHOT_DIR}
    trainer = {
        "name": "trainer",
        "image": job.spec.image,
        "command": ["chaos", "worker", "--config", f"{CONFIG_DIR}/config.json"],
        "ports": [
            {"name": "peers", "containerPort": port},
            {"name": "metrics", "containerPort": port + 1},
        ],
        "volumeMounts": [snapshots, {"name": "config", "mountPath": CONFIG_DIR}],
    }
    if resources:
        trainer["resources"] = resources
    replicator = {
        "name": "replicator",
        "image": job.spec.image,
        "command": [
            "chaos",
            "replicator",
            "--id",
            member,
            "--dir",
            SNAPSHOT_DIR,
            "--listen",
            f"0.0.0.0:{port + 2}",
        ],
        "ports": [{"name": "replication", "containerPort": port + 2}],
        "volumeMounts": [snapshots],
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name,
            "namespace": namespace,
            "labels": {**COMMON_LABELS, LABEL_JOB: name, LABEL_MEMBER: member},
            "annotations": {
                ANN_ORDINAL: str(ordinal),
                ANN_ADDRESS: address,
                ANN_METRICS: str(port + 1),
                ANN_CONFIG: json.dumps(dict(config), sort_keys=True),
            },
            "ownerReferences": [owner_reference(job)],
        },
        "spec": {
            "hostname": pod_name,
            "subdomain": service_name(name),
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 30,
            "containers": [trainer, replicator],
            "volumes": [
                {"name": "snapshots", "emptyDir": {"medium": "Memory"}},
                {
                    "name": "config",
                    "downwardAPI": {
                        "items": [
                            {
                                "path": "config.json",
                                "fieldRef": {"fieldPath": f"metadata.annotations['{ANN_CONFIG}']"},
                            }
                        ]
                    },
                },
            ],
        },
    }


def headless_service(job: ChaosJob) -> dict[str, Any]:
    """The headless Service that gives members stable DNS names (ready or not)."""
    name, namespace, _ = _meta(job)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": service_name(name),
            "namespace": namespace,
            "labels": {**COMMON_LABELS, LABEL_JOB: name},
            "ownerReferences": [owner_reference(job)],
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {LABEL_JOB: name},
            "ports": [{"name": "peers", "port": 7070}],
        },
    }


def next_member(job: ChaosJob, pods: Sequence[ObservedPod]) -> int:
    """The next unused ordinal: past the job's annotation and every pod seen."""
    try:
        remembered = int(job.metadata.annotations.get(ANN_NEXT_MEMBER, "0"))
    except ValueError:
        remembered = 0
    return max([remembered, *(p.ordinal + 1 for p in pods)])


def reconcile(
    job: ChaosJob,
    pods: Sequence[ObservedPod],
    *,
    now: datetime,
    current_step: int | None = None,
    scale_out_delay_s: float | None = None,
    options: Options = Options(),
    federation: FederationView | None = None,
) -> PodPlan:
    """Plan one reconcile of `job` given its observed pods (see the module docstring)."""
    name, namespace, _ = _meta(job)
    spec = job.spec
    cap = federation.cap() if federation else None
    want = spec.replicas if cap is None else min(spec.replicas, cap)
    waiting: str | None = None
    previous = job.status.to_k8s() if job.status else {}
    pods = sorted(pods, key=lambda p: (p.ordinal, p.name))
    live = [p for p in pods if p.live]
    ended = [p for p in pods if not p.deleting and not p.live]
    finished = previous.get("phase") == "Succeeded" or (
        bool(ended) and not live and all(p.phase == "Succeeded" for p in ended)
    )
    step = current_step if current_step is not None else previous.get("currentStep")
    trained = step is not None and step >= options.steps - 1
    ordinal = next_member(job, pods)
    create: list[dict[str, Any]] = []
    delete: list[str] = []
    events: dict[str, PodEvent] = {}

    if not finished and not trained:
        for pod in ended:
            delete.append(pod.name)
            events[pod.name] = PodEvent(
                "MemberLost", f"member {pod.member} ended ({pod.phase}); replacing it", "Warning"
            )
        surplus = len(live) - want
        if surplus > 0:
            for pod in live[-surplus:]:
                delete.append(pod.name)
                events[pod.name] = PodEvent("MemberRemoved", f"scaled down: member {pod.member}")
            live = live[:-surplus]
        missing = want - len(live)
        seeds = [p for p in live if p.address]
        seeds.sort(key=lambda p: (not p.running, p.ordinal))
        remote = federation.seed() if federation and not seeds else None
        if missing > 0 and not seeds and not remote and federation:
            waiting = federation.waiting_for()
        if missing > 0 and not waiting:
            new = list(range(ordinal, ordinal + missing))
            joins = (seeds[0].member, seeds[0].address) if seeds else None
            if remote:
                joins = (f"{remote[1]} of party {remote[0].party}", remote[2])
            if joins:
                for n in new:
                    config = worker_config(job, n, options, join=joins[1])
                    create.append(worker_pod(job, n, config))
                    events[member_name(name, n)] = PodEvent(
                        "MemberAdded",
                        f"member {member_id(name, n, options)} joins through {joins[0]}",
                    )
            else:
                members = {
                    member_id(name, n, options): member_address(name, namespace, n, options)
                    for n in new
                }
                for n in new:
                    config = worker_config(job, n, options, members=members)
                    create.append(worker_pod(job, n, config))
                    events[member_name(name, n)] = PodEvent(
                        "MemberAdded",
                        f"member {member_name(name, n)} starts the initial set of {len(new)}",
                    )
            ordinal += missing

    status = _status(
        job,
        previous,
        pods,
        live,
        ended,
        want=want,
        finished=finished,
        trained=trained,
        creating=len(create),
        now=now,
        current_step=current_step,
        scale_out_delay_s=scale_out_delay_s,
        federation=federation,
        waiting=waiting,
    )
    return PodPlan(
        create=create,
        delete=delete,
        service=headless_service(job),
        status=status,
        next_member=ordinal,
        events=events,
    )


def _status(
    job: ChaosJob,
    previous: Mapping[str, Any],
    pods: Sequence[ObservedPod],
    live: Sequence[ObservedPod],
    ended: Sequence[ObservedPod],
    *,
    want: int,
    finished: bool,
    trained: bool,
    creating: int,
    now: datetime,
    current_step: int | None,
    scale_out_delay_s: float | None,
    federation: FederationView | None = None,
    waiting: str | None = None,
) -> dict[str, Any]:
    name = job.metadata.name or ""
    generation = job.metadata.generation
    running = sum(1 for p in live if p.running)
    lost = [] if finished or trained else list(ended)
    # Pods that vanished since the last status (e.g. `kubectl delete pod`) with no spec change.
    vanished = previous.get("observedGeneration") == generation and previous.get(
        "replicas", 0
    ) > sum(1 for p in pods if p.live)
    conditions = previous.get("conditions", [])
    counts = f"{running} of {want} members running"
    if finished:
        phase = "Succeeded"
        ready = ("False", "TrainingFinished", "every member finished its last step")
        degraded = ("False", "TrainingFinished", "training finished")
    elif trained:
        phase = "Running"
        ready = ("False", "TrainingFinished", "the last step is done; members are finishing")
        degraded = ("False", "TrainingFinished", "training finished")
    elif running == want and len(live) == want and not creating and not lost:
        phase = "Running" if want > 0 else "Paused"
        ready = ("True", "MembersRunning", counts)
        degraded = ("False", "AsExpected", counts)
    else:
        if lost or vanished or previous.get("phase") == "Recovering":
            phase = "Recovering"
        elif running == 0 and previous.get("phase", "Pending") == "Pending":
            phase = "Pending"
        else:
            phase = "Scaling"
        reason = "MembersStarting" if len(live) + creating >= want else "MembersMissing"
        ready = ("False", reason, counts)
        if waiting:
            ready = ("False", "WaitingForSeed", f"{waiting}; {counts}")
        if lost:
            members = ", ".join(p.member for p in lost)
            degraded = ("True", "MemberLost", f"lost {members}; replacements are joining")
        elif phase == "Recovering":
            degraded = ("True", "MemberLost", f"replacing lost members; {counts}")
        else:
            degraded = ("False", "AsExpected", counts)
    changes = [("Degraded", degraded), ("Ready", ready)]
    if federation is not None:
        from chaos_operator.federation.rules import synced_condition

        changes.append(("FederationSynced", synced_condition(federation)))
    for type_, (status, reason, message) in changes:
        conditions = set_condition(conditions, type_, status, reason, message, generation, now)
    out: dict[str, Any] = {
        "phase": phase,
        "conditions": conditions,
        "replicas": len(live) + creating,
        "selector": selector(name),
        "localMembers": running,
    }
    if generation is not None:
        out["observedGeneration"] = generation
    step = current_step if current_step is not None else previous.get("currentStep")
    if step is not None:
        out["currentStep"] = max(step, previous.get("currentStep", 0))
    for key in ("remoteMembers", "lastScaleOutDelaySeconds", "lastScaleTime", "autoscaling"):
        if key in previous:
            out[key] = previous[key]
    if scale_out_delay_s is not None:
        out["lastScaleOutDelaySeconds"] = round(scale_out_delay_s, 3)
    if federation is not None:
        out["remoteMembers"] = federation.remote_members()
    if creating or len(live) != sum(1 for p in pods if p.live):
        out["lastScaleTime"] = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    return out
