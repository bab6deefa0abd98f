"""`ChaosJob`: the workers one party contributes to a federated training job."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from chaos_worker.config import MAX_BUCKET_BYTES, MAX_MICRO_BATCH, MAX_SEED
from pydantic import ConfigDict, Field, model_validator

from chaos_operator.api.durable import CheckpointPolicy, CheckpointRef, ResumeStatus
from chaos_operator.api.meta import (
    API_VERSION,
    ApiModel,
    Condition,
    ObjectMeta,
    Quantity,
    conditions_field,
    immutable,
)
from chaos_operator.api.template import TemplateField

#: `module:factory`, e.g. `chaos_worker.examples.digits:factory` (see examples/README.md).
ENTRY_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"
#: A DNS-1123 label: usable as a label value and inside object names.
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
#: Human summary of a job's state; the conditions carry the details.
Phase = Literal[
    "Pending", "Running", "Scaling", "Recovering", "Paused", "Suspended", "Succeeded", "Failed"
]
#: Most warm spares a job may keep (`spec.spares`).
MAX_SPARES = 16
MAX_BUCKET_KIB = MAX_BUCKET_BYTES >> 10
#: Phases a job never leaves.
TERMINAL_PHASES = ("Succeeded", "Failed")


class ResourceRequirements(ApiModel):
    """Compute resources of each worker pod, as in a container's `resources`."""

    requests: dict[str, Quantity] = Field(
        default_factory=dict,
        description="Resources each worker is guaranteed, e.g. {cpu: 2, memory: 4Gi}.",
    )
    limits: dict[str, Quantity] = Field(
        default_factory=dict,
        description="Most resources each worker may use, e.g. {memory: 8Gi, nvidia.com/gpu: 1}.",
    )


class AutoscalingPolicy(ApiModel):
    """When this party adds or removes its own workers between minReplicas and maxReplicas."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!self.enabled || has(self.targetGoodputPerWorker)",
                    "message": "targetGoodputPerWorker is required when autoscaling is enabled",
                    "fieldPath": ".targetGoodputPerWorker",
                    "reason": "FieldValueRequired",
                }
            ]
        }
    )

    enabled: bool = Field(
        False,
        description="Let the operator change spec.replicas within [minReplicas, maxReplicas].",
    )
    target_goodput_per_worker: float | None = Field(
        None,
        gt=0,
        description=(
            "Training samples per second that each worker should still add to the job's "
            "goodput: the operator adds a worker while the last added one raised the goodput "
            "by at least this much, and removes one when it added less. Required when enabled."
        ),
    )
    cooldown_seconds: int = Field(
        60,
        ge=0,
        le=86400,
        description="Least time between two scaling decisions, in seconds.",
    )

    @model_validator(mode="after")
    def _target_when_enabled(self) -> AutoscalingPolicy:
        if self.enabled and self.target_goodput_per_worker is None:
            raise ValueError("targetGoodputPerWorker is required when autoscaling is enabled")
        return self


class FailurePolicy(ApiModel):
    """When lost members fail the whole job instead of being replaced."""

    max_member_failures: int = Field(
        ge=0,
        description=(
            "Most members that may end Failed within windowSeconds; one more fails the job "
            "(reason TooManyMemberFailures)."
        ),
    )
    window_seconds: int = Field(
        600, ge=1, le=604800, description="The sliding window the failures are counted in."
    )


class ChaosJobSpec(ApiModel):
    """Desired state of this party's part of a federated training job."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.minReplicas <= self.maxReplicas",
                    "message": "minReplicas must not exceed maxReplicas",
                    "fieldPath": ".minReplicas",
                    "reason": "FieldValueInvalid",
                },
                {
                    "rule": "self.minReplicas <= self.replicas"
                    " && self.replicas <= self.maxReplicas",
                    "message": "replicas must lie within [minReplicas, maxReplicas]",
                    "fieldPath": ".replicas",
                    "reason": "FieldValueInvalid",
                },
            ]
        }
    )

    federation: str = Field(
        min_length=1,
        max_length=63,
        pattern=NAME_PATTERN,
        description=(
            "Name of the federated job this ChaosJob contributes workers to; every party uses "
            "the same name for the same job. Immutable."
        ),
        json_schema_extra=immutable("federation"),
    )
    image: str = Field(
        min_length=1,
        max_length=1024,
        description="Container image of the workers, e.g. registry.example/chaos-train:0.1.0.",
    )
    entry: str = Field(
        max_length=512,
        pattern=ENTRY_PATTERN,
        description=(
            "Training factory as module:factory, e.g. chaos_worker.examples.digits:factory; "
            "every worker imports the module and calls the factory. Immutable."
        ),
        json_schema_extra=immutable("entry"),
    )
    global_batch: int = Field(
        ge=1,
        description=(
            "Samples per training step over all parties (G); fixed for the whole job so that "
            "the trajectory does not depend on who computes which sample. Immutable."
        ),
        json_schema_extra=immutable("globalBatch"),
    )
    seed: int = Field(
        0,
        ge=0,
        le=MAX_SEED,
        description="Seed of the model initialisation and the sample order. Immutable.",
        json_schema_extra=immutable("seed"),
    )
    bucket_kib: int | None = Field(
        None,
        ge=1,
        le=MAX_BUCKET_KIB,
        alias="bucketKiB",
        description=(
            "Size of the gradient buckets the all-reduce sends, in KiB (DDP's bucket_cap_mb): "
            "a bucket travels as soon as backward has finished it, so several buckets overlap "
            "the reduction with backward. Unset: 4096 (4 MiB). Every party of a federation "
            "must give the same value: buckets cut another way are refused. Immutable."
        ),
        json_schema_extra=immutable("bucketKiB"),
    )
    micro_batch: int | None = Field(
        None,
        ge=1,
        le=MAX_MICRO_BATCH,
        description=(
            "Most samples a worker of this party puts through one forward and backward pass: "
            "its share of a step is cut into micro-batches of this size and their gradients "
            "summed, which bounds its memory and leaves the step's gradient as it is. Unset: "
            "64. Each party may choose its own; it applies to workers created after a change."
        ),
    )
    replicas: int = Field(
        1,
        ge=0,
        description=(
            "Number of workers this party runs for the job; must lie within "
            "[minReplicas, maxReplicas]. Changed by `kubectl scale` or by the autoscaler."
        ),
    )
    min_replicas: int = Field(
        1, ge=0, description="Fewest workers this party runs (lower bound of replicas)."
    )
    max_replicas: int = Field(
        ge=1, description="Most workers this party runs (upper bound of replicas)."
    )
    spares: int = Field(
        0,
        ge=0,
        le=MAX_SPARES,
        description=(
            "Warm spares: pods started ahead in standby (same template and resources as a "
            "worker, so they count against quotas) that replace a lost member or serve a "
            "scale-up first; a spare trains only once the operator makes it a member."
        ),
    )
    resources: ResourceRequirements = Field(
        default_factory=ResourceRequirements,
        description=(
            "Compute resources of each worker's trainer container; the template's trainer "
            "container resources win, name by name."
        ),
        json_schema_extra={"default": {}},
    )
    steps: int | None = Field(
        None,
        ge=1,
        le=1_000_000_000,
        description=(
            "Training steps of the job (its length); the job Succeeds once the last one is "
            "reduced. Unset: the operator's default (practically unbounded). Every party of a "
            "federation must give the same value. Immutable."
        ),
        json_schema_extra=immutable("steps"),
    )
    state_quorum: int = Field(
        1,
        ge=1,
        le=2,
        description=(
            "Members whose seals must agree on the state a newcomer of this party takes "
            "(with worker TLS): 1, as many as the join has, up to two; 2, always two, so "
            "that one hostile member can never hand our newcomers a forged state, at the "
            "price that a job down to a single member admits no newcomer."
        ),
    )
    template: TemplateField | None = Field(
        None,
        description=(
            "Pod template (core/v1 PodTemplateSpec) merged into every worker pod; fields the "
            "operator owns are refused (docs/operator.md, Pod template)."
        ),
    )
    suspend: bool = Field(
        False,
        description=(
            "Suspend the job: its pods are deleted and none is created until it is false "
            "again (how Kueue admits a job). Training restarts from its latest checkpoint."
        ),
    )
    active_deadline_seconds: int | None = Field(
        None,
        ge=1,
        description=(
            "Seconds the job may run (counted while not suspended) before it Fails with "
            "reason DeadlineExceeded."
        ),
    )
    ttl_seconds_after_finished: int | None = Field(
        None,
        ge=0,
        description="Delete the ChaosJob this many seconds after it Succeeded or Failed.",
    )
    failure_policy: FailurePolicy | None = Field(
        None,
        description="Fail the job when too many members fail; unset: replace them forever.",
    )
    checkpoints: CheckpointPolicy | None = Field(
        None,
        description=(
            "Durable checkpoints on a PersistentVolumeClaim: one member of this party writes "
            "them, and after every member was lost the job resumes from the newest one that "
            "verifies. Unset: no checkpoints (docs/checkpoints.md)."
        ),
    )
    autoscaling: AutoscalingPolicy = Field(
        default_factory=AutoscalingPolicy,
        description="Automatic scaling of this party's workers; off by default.",
        # The whole default, not {}: the API server checks a default against the CEL rules
        # without applying the nested defaults first.
        json_schema_extra={"default": AutoscalingPolicy().to_k8s()},
    )

    @model_validator(mode="after")
    def _replicas_within_bounds(self) -> ChaosJobSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"minReplicas must not exceed maxReplicas, got {self.min_replicas} > "
                f"{self.max_replicas}"
            )
        if not self.min_replicas <= self.replicas <= self.max_replicas:
            raise ValueError(
                "replicas must lie within [minReplicas, maxReplicas] = "
                f"[{self.min_replicas}, {self.max_replicas}], got {self.replicas}"
            )
        return self


class AutoscalingStatus(ApiModel):
    """The autoscaler's latest decision and the measurement behind it."""

    desired_replicas: int | None = Field(
        None, ge=0, description="Replicas the autoscaler wants for this party."
    )
    reason: str | None = Field(
        None,
        max_length=64,
        description="Why, in one word, e.g. GoodputAboveTarget, Cooldown, CapacityExhausted.",
    )
    message: str | None = Field(
        None, max_length=1024, description="Why, with the measured numbers."
    )
    last_decision_time: datetime | None = Field(
        None, description="When the autoscaler last changed spec.replicas."
    )
    goodput_samples_per_second: float | None = Field(
        None, ge=0, description="Measured goodput of the job at the current replica count."
    )
    marginal_goodput_samples_per_second: float | None = Field(
        None, description="What the last added worker added to the goodput (samples/s)."
    )


class MemberFailure(ApiModel):
    """One member that ended Failed (what the failure policy counts)."""

    member: str = Field(max_length=253, description="The member's pod name.")
    time: datetime = Field(description="When the operator saw it failed.")


class ChaosJobStatus(ApiModel):
    """Observed state of this party's part of the job, written by the operator."""

    phase: Phase | None = Field(None, description="Summary of the job's state for humans.")
    conditions: list[Condition] = conditions_field("job")
    observed_generation: int | None = Field(
        None, ge=0, description="The metadata.generation the operator last acted on."
    )
    replicas: int | None = Field(
        None, ge=0, description="Worker pods of this party that currently exist for the job."
    )
    selector: str | None = Field(
        None,
        max_length=1024,
        description="Label selector of this job's worker pods (used by the scale subresource).",
    )
    spares: str | None = Field(
        None,
        max_length=32,
        pattern=r"^[0-9]+/[0-9]+$",
        description="Warm spares ready (pod Running and Ready) / spare pods that exist, e.g. 1/2.",
    )
    local_members: int | None = Field(
        None, ge=0, description="Members of the current training view run by this party."
    )
    remote_members: int | None = Field(
        None, ge=0, description="Members of the current training view run by other parties."
    )
    current_step: int | None = Field(
        None, ge=0, description="Latest training step the job has completed."
    )
    steps: int | None = Field(None, ge=1, description="The job's length (spec.steps) in steps.")
    progress: str | None = Field(
        None, max_length=64, description="Steps completed of the job's steps, e.g. 120/1000."
    )
    durable_step: int | None = Field(
        None,
        ge=0,
        description="Step of the newest checkpoint this party's writer wrote or resumed from.",
    )
    resumed_from: ResumeStatus | None = Field(
        None, description="The checkpoint the latest initial set resumed from."
    )
    final_checkpoint: CheckpointRef | None = Field(
        None, description="The checkpoint of the trained job's final state, once it Succeeded."
    )
    start_time: datetime | None = Field(
        None,
        description="When the job last started running (unset while suspended); the deadline "
        "counts from it.",
    )
    completion_time: datetime | None = Field(None, description="When the job Succeeded or Failed.")
    member_failures: list[MemberFailure] | None = Field(
        None,
        max_length=1000,
        description="Members that ended Failed within the failure policy's window.",
    )
    last_scale_out_delay_seconds: float | None = Field(
        None,
        ge=0,
        description=(
            "Seconds the latest joining worker took from start to contributing to training."
        ),
    )
    last_scale_time: datetime | None = Field(
        None, description="When the operator last changed the number of workers."
    )
    autoscaling: AutoscalingStatus | None = Field(
        None, description="The autoscaler's latest decision, when autoscaling is enabled."
    )


class ChaosJob(ApiModel):
    """This party's workers in a federated, elastic PyTorch training job."""

    api_version: Literal["chaos.training.dev/v1alpha1"] = Field(
        API_VERSION, description="chaos.training.dev/v1alpha1."
    )
    kind: Literal["ChaosJob"] = Field("ChaosJob", description="ChaosJob.")
    metadata: ObjectMeta = Field(default_factory=ObjectMeta, description="Object metadata.")
    spec: ChaosJobSpec = Field(description="Desired state, written by the user.")
    status: ChaosJobStatus | None = Field(
        None, description="Observed state, written by the operator."
    )
