"""Validated inputs and the output of the shard planner (pydantic v2)."""

from __future__ import annotations

from functools import cached_property
from itertools import pairwise
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator

MAX_SHARDS = 2**20
"""Largest shard count accepted: keeps a single plan well under a second."""

DEFAULT_SHARD_COUNTS: tuple[int, ...] = tuple(2**i for i in range(11))
"""The default divisibility chain 1 | 2 | 4 | ... | 1024."""

Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False, strict=True)]
ShardCount = Annotated[StrictInt, Field(gt=0, le=MAX_SHARDS)]


class Source(BaseModel):
    """A member that can send state to the newcomer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Annotated[StrictStr, Field(min_length=1)]
    bandwidth_bytes_per_s: Annotated[float, Field(gt=0, allow_inf_nan=False, strict=True)]
    latency_s: Seconds = 0.0
    ready_s: Seconds = 0.0
    max_shards: Annotated[StrictInt, Field(ge=0)] | None = None

    def shard_limit(self, shards: int) -> int:
        """How many of `shards` shards this source may send: its cap, at most `shards`."""
        return shards if self.max_shards is None else min(self.max_shards, shards)


class PlanRequest(BaseModel):
    """A newcomer needs `state_bytes` bytes, split into K shards with K from `shard_counts`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    state_bytes: Annotated[StrictInt, Field(gt=0)]
    shard_counts: Annotated[list[ShardCount], Field(min_length=1)] = Field(
        default_factory=lambda: list(DEFAULT_SHARD_COUNTS)
    )
    sources: Annotated[list[Source], Field(min_length=1)]

    @field_validator("shard_counts")
    @classmethod
    def _divisibility_chain(cls, counts: list[int]) -> list[int]:
        for i, (small, large) in enumerate(pairwise(counts)):
            if large <= small or large % small:
                raise ValueError(
                    f"must be a strictly increasing divisibility chain, but "
                    f"shard_counts[{i}]={small} does not divide shard_counts[{i + 1}]={large}"
                    if large > small
                    else f"must be strictly increasing, but shard_counts[{i}]={small} "
                    f">= shard_counts[{i + 1}]={large}"
                )
        return counts

    @field_validator("sources")
    @classmethod
    def _unique_ids(cls, sources: list[Source]) -> list[Source]:
        first: dict[str, int] = {}
        for i, source in enumerate(sources):
            if source.id in first:
                raise ValueError(
                    f"ids must be unique, but sources[{first[source.id]}] and sources[{i}] "
                    f"are both {source.id!r}"
                )
            first[source.id] = i
        return sources

    @cached_property
    def by_id(self) -> dict[str, Source]:
        """The sources keyed by id."""
        return {source.id: source for source in self.sources}


class ShardPlan(BaseModel):
    """Which source sends how many of the `shards` shards, and when the last one lands."""

    model_config = ConfigDict(frozen=True)

    solver: str
    shards: int
    shard_bytes: float
    assignment: dict[str, int]
    makespan_s: float

    def shard_indices(self) -> dict[str, list[int]]:
        """Which shards each sending source sends: contiguous runs, largest share first."""
        out: dict[str, list[int]] = {}
        first = 0
        for source in sorted(self.assignment, key=lambda s: (-self.assignment[s], s)):
            count = self.assignment[source]
            if count:
                out[source] = list(range(first, first + count))
                first += count
        return out
