"""`ChaosPeer`: another party this party trusts, and what that party may do here."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from chaos_operator.api.chaosjob import NAME_PATTERN
from chaos_operator.api.meta import API_VERSION, ApiModel, Condition, ObjectMeta, conditions_field

#: An https URL with a host and an optional port and path; peers always talk mutual TLS.
ENDPOINT_PATTERN = (
    r"^https://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?)"
    r"(:[0-9]{1,5})?(/[^\s]*)?$"
)
#: SHA-256 of the remote party's public key (DER SubjectPublicKeyInfo), lowercase hex.
FINGERPRINT_PATTERN = r"^sha256:[0-9a-f]{64}$"
#: PEM text that starts with a certificate.
PEM_PATTERN = r"^\s*-----BEGIN CERTIFICATE-----"


class PeerPolicy(ApiModel):
    """What the remote party may do in this party's jobs."""

    may_contribute_workers: bool = Field(
        True, description="Whether the remote party's workers may join this party's jobs."
    )
    max_workers: int | None = Field(
        None,
        ge=0,
        description="Most workers of the remote party admitted at once; no limit when unset.",
    )


class ChaosPeerSpec(ApiModel):
    """How to reach and authenticate another party's Chaos operator."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.caBundle) != has(self.keyFingerprint)",
                    "message": "exactly one of caBundle and keyFingerprint must be set",
                }
            ]
        }
    )

    party: str = Field(
        min_length=1,
        max_length=63,
        pattern=NAME_PATTERN,
        description=(
            "The remote party's name. Its operator certificate must name this party (common "
            "name); whatever it sends counts for this party and for no other."
        ),
    )
    endpoint: str = Field(
        max_length=2048,
        pattern=ENDPOINT_PATTERN,
        description=(
            "https URL of the remote party's operator, e.g. https://chaos.party-b.example:8443."
        ),
    )
    ca_bundle: str | None = Field(
        None,
        max_length=65536,
        pattern=PEM_PATTERN,
        description=(
            "PEM certificates of the CA that signs the remote operator's certificate. "
            "Exactly one of caBundle and keyFingerprint is set."
        ),
    )
    key_fingerprint: str | None = Field(
        None,
        pattern=FINGERPRINT_PATTERN,
        description=(
            "sha256:<64 hex digits>, the SHA-256 of the remote operator's public key "
            "(DER SubjectPublicKeyInfo). Exactly one of caBundle and keyFingerprint is set."
        ),
    )
    policy: PeerPolicy = Field(
        default_factory=PeerPolicy,
        description="What the remote party may do in this party's jobs.",
        json_schema_extra={"default": PeerPolicy().to_k8s()},
    )

    @model_validator(mode="after")
    def _exactly_one_trust_anchor(self) -> ChaosPeerSpec:
        if (self.ca_bundle is None) == (self.key_fingerprint is None):
            raise ValueError("exactly one of caBundle and keyFingerprint must be set")
        return self


class ChaosPeerStatus(ApiModel):
    """What this party's operator last observed about the remote party."""

    reachable: bool | None = Field(
        None, description="Whether the last mutually authenticated handshake succeeded."
    )
    last_handshake_time: datetime | None = Field(
        None, description="When the last successful handshake with the remote operator ended."
    )
    members: int | None = Field(
        None, ge=0, description="Workers of the remote party currently in this party's jobs."
    )
    conditions: list[Condition] = conditions_field("peer")
    observed_generation: int | None = Field(
        None, ge=0, description="The metadata.generation the operator last acted on."
    )


class ChaosPeer(ApiModel):
    """Another party that this party trusts, pinned by CA or key fingerprint."""

    api_version: Literal["chaos.training.dev/v1alpha1"] = Field(
        API_VERSION, description="chaos.training.dev/v1alpha1."
    )
    kind: Literal["ChaosPeer"] = Field("ChaosPeer", description="ChaosPeer.")
    metadata: ObjectMeta = Field(default_factory=ObjectMeta, description="Object metadata.")
    spec: ChaosPeerSpec = Field(description="How to reach and trust the remote party.")
    status: ChaosPeerStatus | None = Field(
        None, description="Observed state, written by the operator."
    )
