"""Shared pieces of the Chaos API: the camelCase base model, object metadata and conditions."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema
from pydantic.alias_generators import to_camel

GROUP = "chaos.training.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

#: metav1.Condition limits (k8s.io/apimachinery pkg/apis/meta/v1/types.go).
CONDITION_TYPE_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"
)
CONDITION_REASON_PATTERN = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
MAX_CONDITIONS = 32
#: A Kubernetes resource quantity such as `500m`, `2`, `4Gi` or `1e3`.
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)


def _quantity(value: int | str) -> int | str:
    if isinstance(value, str) and not re.fullmatch(QUANTITY_PATTERN, value):
        raise ValueError(f"must be a resource quantity such as 500m, 2 or 4Gi, not {value!r}")
    return value


#: A resource quantity: an integer or a string such as `500m` (int-or-string in the CRD).
Quantity = Annotated[
    int | str,
    AfterValidator(_quantity),
    WithJsonSchema(
        {
            "description": "A resource quantity, e.g. 500m, 2 or 4Gi.",
            "x-kubernetes-int-or-string": True,
            "pattern": QUANTITY_PATTERN,
        }
    ),
]


def immutable(field: str) -> dict[str, Any]:
    """Schema extras for a CEL transition rule that refuses changes of `field`."""
    return {
        "x-kubernetes-validations": [
            {"rule": "self == oldSelf", "message": f"{field} is immutable once the job exists"}
        ]
    }


class ApiModel(BaseModel):
    """Base of every API model: camelCase names in YAML/JSON, snake_case in Python.

    Unknown fields are rejected, so a typo in a manifest is an error and not a silent no-op
    (the API server prunes unknown fields of stored objects, so nothing read back has any).
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_assignment=True,
    )

    def to_k8s(self) -> dict:
        """The object as the Kubernetes API writes it: camelCase, no unset optional fields."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class ObjectMeta(BaseModel):
    """The parts of Kubernetes object metadata that Chaos reads; everything else is kept."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    name: str | None = Field(None, description="Name of the object, unique in its namespace.")
    namespace: str | None = Field(None, description="Namespace the object lives in.")
    labels: dict[str, str] = Field(default_factory=dict, description="Labels of the object.")
    annotations: dict[str, str] = Field(
        default_factory=dict, description="Annotations of the object."
    )
    generation: int | None = Field(
        None, description="Sequence number of the desired state, set by the API server."
    )


class Condition(ApiModel):
    """One aspect of the object's current state, in the shape of Kubernetes' metav1.Condition."""

    type: str = Field(
        max_length=316,
        pattern=CONDITION_TYPE_PATTERN,
        description="Condition type in CamelCase, e.g. Ready, WorkersReady or PeersConnected.",
    )
    status: Literal["True", "False", "Unknown"] = Field(
        description="Whether the condition holds: True, False or Unknown."
    )
    reason: str = Field(
        min_length=1,
        max_length=1024,
        pattern=CONDITION_REASON_PATTERN,
        description="Machine-readable CamelCase reason for the last transition.",
    )
    message: str = Field(
        max_length=32768, description="Human-readable details about the last transition."
    )
    last_transition_time: datetime = Field(
        description="When the status last changed from one value to another."
    )
    observed_generation: int | None = Field(
        None,
        ge=0,
        description="The metadata.generation that the condition was computed from.",
    )


def conditions_field(what: str) -> Any:
    """A `conditions` list field (a list-map keyed by `type`, as Kubernetes conventions ask)."""
    return Field(
        default_factory=list,
        max_length=MAX_CONDITIONS,
        description=f"Latest observations of the {what}'s state, one entry per condition type.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
    )
