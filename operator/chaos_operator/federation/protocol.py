"""The messages operators of different parties exchange (version 1), validated with pydantic.

One exchange is `POST /v1/sync` over mutually authenticated TLS: the client sends its
`SyncMessage`, the server answers with its own. A message says, per federation name, which
members the sender runs (id -> data-plane address), how many workers it wants, and whether the
*receiving* party's workers may join (its `ChaosPeer` policy for the receiver). It is only
information: nothing in it asks the receiver to create or delete anything. It also carries
the sender's worker CA certificate (public), which the receiver checks and cross-certifies
for its pods' trust bundles (`workerca`).

Everything is bounded and checked before it is used: the body's size, the counts, every
string by pattern and length, every number by range; numbers are JSON integers only (strict:
no floats, NaN, Infinity, strings or booleans in their place). Which values a receiver then
trusts, and for whose workers, is `rules`' business.
"""

from __future__ import annotations

from typing import Annotated, Literal

from chaos_worker.config import MAX_BUCKET_BYTES, MAX_SEED
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)
from pydantic.alias_generators import to_camel

from chaos_operator.api.chaosjob import ENTRY_PATTERN, NAME_PATTERN

VERSION = 1
SYNC_PATH = "/v1/sync"
MAX_BODY_BYTES = 1 << 20
MAX_MEMBERS = 1000
MAX_FEDERATIONS = 256
MAX_WORKERS = 100_000
MAX_CA_CHARS = 8192

PartyName = Annotated[str, StringConstraints(pattern=NAME_PATTERN, max_length=63)]
MemberId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]+$", max_length=253)]


def _port_in_range(address: str) -> str:
    if not 0 < int(address.rpartition(":")[2]) < 65536:
        raise ValueError(f"port of {address!r} out of 1..65535")
    return address


Address = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z0-9.-]{1,253}:[0-9]{1,5}$", max_length=259),
    AfterValidator(_port_in_range),
]
"""host:port of a trainer: a DNS name or IPv4 address and a port in 1..65535."""
Count = Annotated[int, Field(ge=0, le=MAX_WORKERS)]
CertificatePem = Annotated[
    str,
    StringConstraints(
        pattern=r"^-----BEGIN CERTIFICATE-----\n[A-Za-z0-9+/=\n]+-----END CERTIFICATE-----\n?$",
        max_length=MAX_CA_CHARS,
    ),
]
"""One PEM certificate (its contents are checked by `workerca.peer_ca` where it is used)."""


class _Message(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        strict=True,
        allow_inf_nan=False,
    )


class FederationInfo(_Message):
    """The sender's part of one federated job, as the receiver should see it."""

    name: PartyName = Field(description="The federation name (ChaosJob spec.federation).")
    members: dict[MemberId, Address] = Field(
        default_factory=dict,
        max_length=MAX_MEMBERS,
        description="The sender's running members: id -> host:port of the trainer.",
    )
    replicas: Count = Field(description="Workers the sender wants to run.")
    starting: Count = Field(0, description="The sender's members created but not running yet.")
    admitted: bool = Field(
        description="Whether the receiver's workers may join this federation at the sender."
    )
    max_workers: Count | None = Field(
        None, description="Most workers of the receiver admitted at once; None: no limit."
    )
    steps: Annotated[int, Field(ge=1, le=1_000_000_000)] | None = Field(
        None,
        description="The job's length (ChaosJob spec.steps); parties must agree. None: unsaid.",
    )
    entry: Annotated[str, Field(max_length=512, pattern=ENTRY_PATTERN)] | None = Field(
        None, description="What the job trains (ChaosJob spec.entry); parties must agree."
    )
    global_batch: Annotated[int, Field(ge=1, le=2**63 - 1)] | None = Field(
        None, description="The job's global batch (ChaosJob spec.globalBatch); parties must agree."
    )
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = Field(
        None, description="The job's seed (ChaosJob spec.seed); parties must agree."
    )
    bucket_bytes: Annotated[int, Field(ge=1024, le=MAX_BUCKET_BYTES)] | None = Field(
        None,
        description="The job's all-reduce bucket in bytes (ChaosJob spec.bucketKiB); parties "
        "must agree. None: the workers' default (4 MiB), which is never said.",
    )


class SyncMessage(_Message):
    """Everything one party tells another in one exchange."""

    version: Literal[1] = VERSION
    party: PartyName = Field(description="The sender; must equal its certificate's party.")
    federations: list[FederationInfo] = Field(default_factory=list, max_length=MAX_FEDERATIONS)
    worker_ca: CertificatePem | None = Field(
        None,
        description="The sender's worker CA (public certificate) for the namespace of the "
        "receiver's ChaosPeer, which the receiver cross-certifies for its pods; None: none yet.",
    )

    @model_validator(mode="after")
    def _unique_names(self) -> SyncMessage:
        names = [f.name for f in self.federations]
        if len(names) != len(set(names)):
            raise ValueError("federation names must be unique")
        return self

    def federation(self, name: str) -> FederationInfo | None:
        return next((f for f in self.federations if f.name == name), None)

    def encode(self) -> bytes:
        """JSON in camelCase, fields that are None left out: an operator that predates an
        optional field still parses what we send while that field is unset."""
        return self.model_dump_json(by_alias=True, exclude_none=True).encode()

    @classmethod
    def decode(cls, data: bytes) -> SyncMessage:
        """Parse and validate; ValueError (pydantic's ValidationError) on anything malformed."""
        if len(data) > MAX_BODY_BYTES:
            raise ValueError(f"message larger than {MAX_BODY_BYTES} bytes")
        return cls.model_validate_json(data)
