"""What a ChaosJob's members look like in Kubernetes: names, addresses, the worker pod.

Builders only (no decisions, no I/O): `chaos_operator.reconcile` decides which members exist,
this module says how one member is named, addressed, configured and packed into a pod.

Addresses: every member gets a port from its ordinal (`base_port + 3 * (ordinal % 1000)`:
trainer, +1 metrics, +2 replicator) and a host: its DNS name under the job's headless
Service (`hostname`/`subdomain` are set on the pod), or a fixed `pod_host` (tests run every
pod on 127.0.0.1). Ports differ between members so that pods sharing one host do not clash.

The member's `WorkerConfig` (the control plane's contract with `chaos worker`) goes into the
pod's annotation `chaos.training.dev/config`, which a downwardAPI volume projects as the
trainer's config file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from chaos_worker.config import WorkerConfig

from chaos_operator.api import API_VERSION, ChaosJob

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


def job_meta(job: ChaosJob) -> tuple[str, str, str]:
    """(name, namespace, uid) of `job`; namespace `default` when it has none."""
    extra = job.metadata.model_extra or {}
    return job.metadata.name or "", job.metadata.namespace or "default", str(extra.get("uid", ""))


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


def owner_reference(job: ChaosJob) -> dict[str, Any]:
    name, _, uid = job_meta(job)
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
) -> WorkerConfig:
    """The `chaos worker` configuration of one member: an initial one (`members`) or a
    newcomer (`join`). Only the fields set here are written to the pod (`worker_pod`)."""
    name, namespace, _ = job_meta(job)
    address = member_address(name, namespace, ordinal, options)
    port = int(address.rpartition(":")[2])
    fields: dict[str, Any] = {
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
        fields["members"] = dict(sorted(members.items()))
    else:
        fields["join"] = join
    return WorkerConfig(**fields)


def worker_pod(job: ChaosJob, ordinal: int, config: WorkerConfig) -> dict[str, Any]:
    """The pod of one member: trainer and replicator sharing a memory-backed volume."""
    name, namespace, _ = job_meta(job)
    pod_name = member_name(name, ordinal)
    port = int(config.listen.rpartition(":")[2])
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
            config.id,
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
            "labels": {**COMMON_LABELS, LABEL_JOB: name, LABEL_MEMBER: config.id},
            "annotations": {
                ANN_ORDINAL: str(ordinal),
                ANN_ADDRESS: config.listen,
                ANN_METRICS: str(port + 1),
                ANN_CONFIG: config.model_dump_json(exclude_unset=True),
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
    name, namespace, _ = job_meta(job)
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
