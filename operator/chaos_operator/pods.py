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

Checkpoints (`spec.checkpoints`): the writer, one member of the party, mounts the claim
(`claim_name`; `checkpoint_claim` is the one the operator creates when the spec gives a size)
at `/checkpoints` and writes there whenever it trains (`checkpoint_writer: self`); its pod is
annotated `chaos.training.dev/checkpoint-writer`. A resuming writer also reads it
(`resume_from`), starting at step 0 when it holds no sound checkpoint.

Identity (`Options.worker_tls`): the config's `tls` names files under `/etc/chaos-tls`, where
the trainer and the replicator mount the Secret `<pod>-tls` read-only (`tls_secret`: the
member's certificate and key, the CA bundle and its admission to the job, owned by the pod).
The operator issues it
(`chaos_operator.identities`); paths only ever reach the pod's annotations and arguments.
"""

from __future__ import annotations

import base64
import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from chaos_worker.config import BUCKET_BYTES, TlsFiles, WorkerConfig

from chaos_operator.api import API_VERSION, ChaosJob
from chaos_operator.api.template import CHECKPOINT_DIR, CONFIG_DIR, SNAPSHOT_DIR, TLS_DIR

CONFIG_FILE = f"{CONFIG_DIR}/config.json"
"""The trainer's config: the projection of the pod's `chaos.training.dev/config`."""
TERMINATION_LOG = "/dev/termination-log"
"""The trainer's terminationMessagePath: it writes its last step there on exit."""

LABEL_JOB = "chaos.training.dev/job"
LABEL_MEMBER = "chaos.training.dev/member"
LABEL_ROLE = "chaos.training.dev/role"
ROLE_MEMBER = "member"
ROLE_SPARE = "spare"
"""A warm spare: started up, in standby, no member of any view (`chaos_operator.spares`)."""
ANN_ORDINAL = "chaos.training.dev/ordinal"
ANN_ADDRESS = "chaos.training.dev/address"
ANN_METRICS = "chaos.training.dev/metrics-port"
ANN_CONFIG = "chaos.training.dev/config"
ANN_NEXT_MEMBER = "chaos.training.dev/next-member"
ANN_WRITER = "chaos.training.dev/checkpoint-writer"
COMMON_LABELS = {
    "app.kubernetes.io/managed-by": "chaos-operator",
    "app.kubernetes.io/part-of": "chaos",
    "app.kubernetes.io/component": "worker",
}
ADMISSION_KEY = "admission.json"
"""The Secret's entry holding the member's admission to its job (`chaos_worker.config`)."""
TLS_FILES = TlsFiles(
    cert=f"{TLS_DIR}/tls.crt",
    key=f"{TLS_DIR}/tls.key",
    ca=f"{TLS_DIR}/ca.crt",
    admission=f"{TLS_DIR}/{ADMISSION_KEY}",
)
TLS_MODE = 0o444
"""The Secret's files are readable by the pod's processes whatever user the job's image runs
as (the operator cannot know it); nothing outside the pod sees them."""
PORTS_PER_MEMBER = 3
PORT_WRAP = 1000


@dataclass(frozen=True)
class Options:
    """How pods are addressed and how long workers train (operator-wide settings)."""

    base_port: int = 7070
    pod_host: str | None = None
    cluster_domain: str = "cluster.local"
    steps: int = 1_000_000_000
    """Steps of a job whose spec has none (practically unbounded)."""
    heartbeat_interval_s: float = 0.25
    failure_timeout_s: float = 5.0
    party: str | None = None
    """This party's name when federation is on: member ids become `<party>.<pod name>`."""
    seed_wait_s: float = 300.0
    """Longest wait for another party's initial set, counted from `Ready` turning False."""
    worker_tls: bool = False
    """Workers speak mutual TLS with a certificate from the operator (Secret `<pod>-tls`)."""


def job_steps(job: ChaosJob, options: Options) -> int:
    """The job's length: `spec.steps`, else the operator's default."""
    return job.spec.steps if job.spec.steps is not None else options.steps


def job_bucket_bytes(job: ChaosJob) -> int:
    """The job's all-reduce bucket: `spec.bucketKiB`, else the workers' default."""
    return job.spec.bucket_kib << 10 if job.spec.bucket_kib is not None else BUCKET_BYTES


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


def tls_secret_name(pod: str) -> str:
    """The Secret holding the identity of pod `pod`."""
    return f"{pod}-tls"


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


def claim_name(job: ChaosJob) -> str | None:
    """The claim the job's checkpoints go to (None: no checkpoints)."""
    policy = job.spec.checkpoints
    if policy is None:
        return None
    return policy.claim_name or f"{job_meta(job)[0]}-checkpoints"


def checkpoint_claim(job: ChaosJob) -> dict[str, Any] | None:
    """The PersistentVolumeClaim the operator creates for the checkpoints (a spec that gives
    a size), owned by the job; None when the spec names an existing claim or none."""
    policy = job.spec.checkpoints
    if policy is None or policy.size is None:
        return None
    name, namespace, _ = job_meta(job)
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": policy.size}},
    }
    if policy.storage_class_name:
        spec["storageClassName"] = policy.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": claim_name(job),
            "namespace": namespace,
            "labels": {**COMMON_LABELS, LABEL_JOB: name},
            "ownerReferences": [owner_reference(job)],
        },
        "spec": spec,
    }


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
    writer: bool = False,
    resume: bool = False,
    standby: bool = False,
) -> WorkerConfig:
    """The `chaos worker` configuration of one member: an initial one (`members`), a
    newcomer (`join`) or a warm spare (`standby`: it waits until its config file names a
    member to join through); `writer`: it writes the party's checkpoints, `resume`: it starts
    from the newest one (an initial member). Only the fields set here are written to the pod
    (`worker_pod`)."""
    name, namespace, _ = job_meta(job)
    address = member_address(name, namespace, ordinal, options)
    port = int(address.rpartition(":")[2])
    fields: dict[str, Any] = {
        "id": member_id(name, ordinal, options),
        "listen": address,
        "entry": job.spec.entry,
        "seed": job.spec.seed,
        "global_batch": job.spec.global_batch,
        "steps": job_steps(job, options),
        "heartbeat_interval_s": options.heartbeat_interval_s,
        "failure_timeout_s": options.failure_timeout_s,
        "metrics_port": port + 1,
        "snapshot_dir": SNAPSHOT_DIR,
        "termination_log": TERMINATION_LOG,
        # the pod's `replicator` container serves the snapshots (see worker_pod)
        "replicator_address": f"{address.rpartition(':')[0]}:{port + 2}",
    }
    if job.spec.bucket_kib is not None:
        fields["bucket_bytes"] = job_bucket_bytes(job)
    if job.spec.micro_batch is not None:
        fields["micro_batch"] = job.spec.micro_batch
    if members:
        fields["members"] = dict(sorted(members.items()))
    elif standby:
        fields["standby"] = True
        fields["standby_file"] = CONFIG_FILE
    else:
        fields["join"] = join
    if options.worker_tls:
        fields["tls"] = TLS_FILES
        fields["state_quorum"] = job.spec.state_quorum
    policy = job.spec.checkpoints
    if writer and policy is not None:
        fields["checkpoint_dir"] = CHECKPOINT_DIR
        fields["checkpoint_writer"] = "self"
        fields["checkpoint_every_steps"] = policy.every_steps or None
        if policy.every_seconds is not None:
            fields["checkpoint_every_s"] = float(policy.every_seconds)
        fields["checkpoint_keep"] = policy.keep
        if resume:
            fields["resume_from"] = CHECKPOINT_DIR
            fields["resume_required"] = False
    return WorkerConfig(**fields)


def worker_pod(job: ChaosJob, ordinal: int, config: WorkerConfig) -> dict[str, Any]:
    """The pod of one member: trainer and replicator sharing a memory-backed volume (and,
    with `config.tls`, the identity Secret `<pod>-tls`)."""
    name, namespace, _ = job_meta(job)
    pod_name = member_name(name, ordinal)
    port = int(config.listen.rpartition(":")[2])
    resources = {k: v for k, v in job.spec.resources.to_k8s().items() if v}
    snapshots = {"name": "snapshots", "mountPath": SNAPSHOT_DIR}
    trainer = {
        "name": "trainer",
        "image": job.spec.image,
        "command": ["chaos", "worker", "--config", CONFIG_FILE],
        "terminationMessagePath": TERMINATION_LOG,
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
    volumes: list[dict[str, Any]] = [
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
    ]
    annotations = {
        ANN_ORDINAL: str(ordinal),
        ANN_ADDRESS: config.listen,
        ANN_METRICS: str(port + 1),
        ANN_CONFIG: config.model_dump_json(exclude_unset=True),
    }
    claim = claim_name(job)
    if config.checkpoint_dir and claim:
        volumes.append({"name": "checkpoints", "persistentVolumeClaim": {"claimName": claim}})
        trainer["volumeMounts"].append({"name": "checkpoints", "mountPath": CHECKPOINT_DIR})
        annotations[ANN_WRITER] = "true"
    if config.tls is not None:
        tls = config.tls
        volumes.append(
            {
                "name": "tls",
                "secret": {"secretName": tls_secret_name(pod_name), "defaultMode": TLS_MODE},
            }
        )
        for container in (trainer, replicator):
            container["volumeMounts"].append(
                {"name": "tls", "mountPath": TLS_DIR, "readOnly": True}
            )
        replicator["command"] += ["--tls-cert", tls.cert, "--tls-key", tls.key, "--tls-ca", tls.ca]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name,
            "namespace": namespace,
            "labels": {
                **COMMON_LABELS,
                LABEL_JOB: name,
                LABEL_MEMBER: config.id,
                LABEL_ROLE: ROLE_SPARE if config.standby else ROLE_MEMBER,
            },
            "annotations": annotations,
            "ownerReferences": [owner_reference(job)],
        },
        "spec": {
            "hostname": pod_name,
            "subdomain": service_name(name),
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 30,
            "containers": [trainer, replicator],
            "volumes": volumes,
        },
    }
    if job.spec.template is None:
        return pod
    return merge_template(pod, job.spec.template.to_k8s())


def merge_template(pod: dict[str, Any], template: Mapping[str, Any]) -> dict[str, Any]:
    """`pod` (the operator's) merged with the user's pod `template` (a PodTemplateSpec).

    The template's labels and annotations are added (the operator's keys win); its pod spec
    fields are taken, except the containers and volumes, which are merged: a template
    container named `trainer` or `replicator` adds to the operator's container of that name
    (its env, envFrom and volumeMounts are appended, its resources override the job's name by
    name, any other field is taken), other containers are added after them, and the
    template's volumes after the operator's. The API model refuses templates that set what
    the operator owns (`api.template`), so nothing here overrides it.
    """
    meta, spec = pod["metadata"], pod["spec"]
    user_meta = template.get("metadata") or {}
    for key in ("labels", "annotations"):
        meta[key] = {**(user_meta.get(key) or {}), **meta[key]}
    user = copy.deepcopy(dict(template.get("spec") or {}))
    user_containers = {c.get("name"): c for c in user.pop("containers", None) or ()}
    user_volumes = user.pop("volumes", None) or []
    merged = {**user, **spec}
    if "terminationGracePeriodSeconds" in user:
        merged["terminationGracePeriodSeconds"] = user["terminationGracePeriodSeconds"]
    containers = []
    for ours in spec["containers"]:
        theirs = user_containers.pop(ours["name"], None)
        containers.append(_merge_container(ours, theirs) if theirs else ours)
    merged["containers"] = containers + list(user_containers.values())
    merged["volumes"] = spec["volumes"] + user_volumes
    pod["spec"] = merged
    return pod


def _merge_container(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    out = {**theirs, **ours}
    for key in ("env", "envFrom", "volumeMounts"):
        if theirs.get(key):
            out[key] = [*(ours.get(key) or ()), *theirs[key]]
    mine, given = ours.get("resources") or {}, theirs.get("resources") or {}
    resources = {**given}  # e.g. claims
    for kind in ("requests", "limits"):
        value = {**mine.get(kind, {}), **given.get(kind, {})}
        if value:
            resources[kind] = value
    if resources:
        out["resources"] = resources
    return out


def tls_secret(
    namespace: str,
    pod: str,
    pod_uid: str,
    labels: Mapping[str, str],
    *,
    cert: bytes,
    key: bytes,
    ca: bytes,
    admission: bytes | None = None,
) -> dict[str, Any]:
    """The `kubernetes.io/tls` Secret `<pod>-tls` with a member's certificate, key and CA
    bundle (PEM), and its admission to its job (`ADMISSION_KEY`), labelled `labels` (the
    pod's) and owned by the pod: it goes with it."""
    data = {"tls.crt": cert, "tls.key": key, "ca.crt": ca}
    if admission is not None:
        data[ADMISSION_KEY] = admission
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": {
            "name": tls_secret_name(pod),
            "namespace": namespace,
            "labels": dict(labels),
            "ownerReferences": [
                {"apiVersion": "v1", "kind": "Pod", "name": pod, "uid": pod_uid, "controller": True}
            ],
        },
        "data": {k: base64.b64encode(v).decode() for k, v in data.items()},
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
