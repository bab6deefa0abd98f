"""The messages operators of different parties exchange (version 1), validated with pydantic.

One exchange is `POST /v1/sync` over mutually authenticated TLS: the client sends its
`SyncMessage`, the server answers with its own. A message says, per federation name, which
members the sender runs (id -> data-plane address), how many workers it wants, and whether the
*receiving* party's workers may join (its `ChaosPeer` policy for the receiver). It is only
information: nothing in it asks the receiver to create or delete anything.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator
from pydantic.alias_generators import to_camel

from chaos_operator.api.chaosjob import NAME_PATTERN

VERSION = 1
SYNC_PATH = "/v1/sync"
MAX_BODY_BYTES = 1 << 20
MAX_MEMBERS = 1000
MAX_FEDERATIONS = 256

PartyName = Annotated[str, StringConstraints(pattern=NAME_PATTERN, max_length=63)]
MemberId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]+$", max_length=253)]
Address = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z0-9.-]{1,253}:[0-9]{1,5}$", max_length=259)
]


class _Message(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class FederationInfo(_Message):
    """The sender's part of one federated job, as the receiver should see it."""

    name: PartyName = Field(description="The federation name (ChaosJob spec.federation).")
    members: dict[MemberId, Address] = Field(
        default_factory=dict,
        max_length=MAX_MEMBERS,
        description="The sender's running members: id -> host:port of the trainer.",
    )
    replicas: int = Field(ge=0, le=100_000, description="Workers the sender wants to run.")
    starting: int = Field(
        0, ge=0, le=100_000, description="The sender's members created but not running yet."
    )
    admitted: bool = Field(
        description="Whether the receiver's workers may join this federation at the sender."
    )
    max_workers: int | None = Field(
        None, ge=0, description="Most workers of the receiver admitted at once; None: no limit."
    )


class SyncMessage(_Message):
    """Everything one party tells another in one exchange."""

    version: Literal[1] = VERSION
    party: PartyName = Field(description="The sender; must equal its certificate's party.")
    federations: list[FederationInfo] = Field(default_factory=list, max_length=MAX_FEDERATIONS)

    @model_validator(mode="after")
    def _unique_names(self) -> SyncMessage:
        names = [f.name for f in self.federations]
        if len(names) != len(set(names)):
            raise ValueError("federation names must be unique")
        return self

    def federation(self, name: str) -> FederationInfo | None:
        return next((f for f in self.federations if f.name == name), None)

    def encode(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode()

    @classmethod
    def decode(cls, data: bytes) -> SyncMessage:
        """Parse and validate; ValueError (pydantic's ValidationError) on anything malformed."""
        if len(data) > MAX_BODY_BYTES:
            raise ValueError(f"message larger than {MAX_BODY_BYTES} bytes")
        return cls.model_validate_json(data)
