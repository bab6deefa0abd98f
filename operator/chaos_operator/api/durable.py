"""`spec.checkpoints` of a ChaosJob and what its status says of them (docs/checkpoints.md).

A party names the storage its checkpoints go to: an existing PersistentVolumeClaim
(`claimName`), or a size (and optionally a storage class) for a claim the operator creates,
`<job>-checkpoints`, owned by the job. One member of the party (the writer) mounts it and
writes there; after every member was lost, the new initial set starts from the newest
checkpoint in it that verifies.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import ConfigDict, Field, model_validator

from chaos_operator.api.meta import ApiModel, Quantity, immutable

#: A DNS-1123 subdomain: the name of a PersistentVolumeClaim or a StorageClass.
SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
MAX_SKIPPED = 16
#: One checkpoint passed over at resume and why.
Skipped = Annotated[str, Field(max_length=512, description="<checkpoint>: <why>")]


class CheckpointPolicy(ApiModel):
    """Where this party's checkpoints go and how often its writer writes them."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.claimName) != has(self.size)",
                    "message": "give either claimName (an existing PersistentVolumeClaim) or "
                    "size (a claim the operator creates), not both",
                    "reason": "FieldValueInvalid",
                },
                {
                    "rule": "!has(self.storageClassName) || has(self.size)",
                    "message": "storageClassName is for a claim the operator creates: give "
                    "size with it",
                    "fieldPath": ".storageClassName",
                    "reason": "FieldValueInvalid",
                },
            ]
        }
    )

    claim_name: str | None = Field(
        None,
        max_length=253,
        pattern=SUBDOMAIN_PATTERN,
        description="An existing PersistentVolumeClaim in the job's namespace to write the "
        "checkpoints to (kept when the job is deleted). Immutable.",
        json_schema_extra=immutable("checkpoints.claimName"),
    )
    storage_class_name: str | None = Field(
        None,
        max_length=253,
        pattern=SUBDOMAIN_PATTERN,
        description="Storage class of the claim the operator creates (default: the "
        "cluster's default class). Immutable.",
        json_schema_extra=immutable("checkpoints.storageClassName"),
    )
    size: Quantity | None = Field(
        None,
        description="Size of the claim the operator creates, <job>-checkpoints "
        "(ReadWriteOnce, deleted with the job), e.g. 10Gi. Immutable.",
        json_schema_extra=immutable("checkpoints.size"),
    )
    every_steps: int = Field(
        100,
        ge=0,
        le=1_000_000_000,
        description="Write a checkpoint every this many steps (0: not by steps).",
    )
    every_seconds: int | None = Field(
        None,
        ge=1,
        le=604800,
        description="Also write one when this many seconds have passed since the last.",
    )
    keep: int = Field(3, ge=1, le=1000, description="Checkpoints kept: the newest ones.")

    @model_validator(mode="after")
    def _one_storage(self) -> CheckpointPolicy:
        if (self.claim_name is None) == (self.size is None):
            raise ValueError(
                "give either claimName (an existing PersistentVolumeClaim) or size (a claim "
                "the operator creates), not both"
            )
        if self.storage_class_name is not None and self.size is None:
            raise ValueError("storageClassName is for a claim the operator creates: give size")
        return self


class CheckpointRef(ApiModel):
    """One checkpoint: where it lies and the step it holds."""

    claim_name: str = Field(max_length=253, description="The claim it lies on.")
    path: str = Field(max_length=64, description="Its directory in the claim, e.g. step-00000200.")
    step: int = Field(ge=0, description="The step it starts training at (steps done before).")


class ResumeStatus(ApiModel):
    """Where the job's latest initial set started from after every member was lost."""

    claim_name: str = Field(max_length=253, description="The claim it resumed from.")
    time: datetime = Field(description="When the operator started the resumed initial set.")
    step: int | None = Field(
        None,
        ge=0,
        description="The step it resumed at (0: no checkpoint verified, it started afresh); "
        "unset until the resumed member reports it.",
    )
    path: str | None = Field(
        None, max_length=64, description="The checkpoint's directory in the claim."
    )
    skipped: list[Skipped] | None = Field(
        None,
        max_length=MAX_SKIPPED,
        description="Newer checkpoints passed over because they did not verify, each "
        "`<checkpoint>: <why>`.",
    )
