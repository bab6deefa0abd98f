"""Bundled link profiles: `--links @three-party` expands to a link spec for the job's workers.

A profile (`<name>.json` next to this file) names parties, the shape of links inside a
party (`intra`) and between each pair of parties (`inter`, `RATE[+DELAY]` as in
`chaos_worker.net.shaping`). Worker number `i` of the job (initial workers in order, then the
joiners in the order of the churn schedule) belongs to party `i mod len(parties)`.
"""

from __future__ import annotations

import json
from importlib import resources

from chaos_worker.net.shaping import ShapeError, parse_shape
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class Profile(BaseModel):
    """Parties and link shapes; see the module docstring."""

    model_config = ConfigDict(extra="forbid")

    description: str = ""
    parties: list[str] = Field(min_length=1)
    intra: str
    inter: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _complete(self) -> Profile:
        for shape in (self.intra, *self.inter.values()):
            parse_shape(shape)  # ShapeError (a ValueError) names the bad shape
        for i, a in enumerate(self.parties):
            for b in self.parties[i + 1 :]:
                if self.inter_shape(a, b) is None:
                    raise ValueError(f"no inter-party shape for {a}-{b}")
        return self

    def inter_shape(self, a: str, b: str) -> str | None:
        return self.inter.get(f"{a}-{b}", self.inter.get(f"{b}-{a}"))

    def party_of(self, workers: list[str]) -> dict[str, str]:
        return {w: self.parties[i % len(self.parties)] for i, w in enumerate(workers)}

    def links(self, workers: list[str]) -> str:
        """The `--links` spec of this profile for `workers` (every pair named)."""
        party = self.party_of(workers)
        items = []
        for i, a in enumerate(workers):
            for b in workers[i + 1 :]:
                same = party[a] == party[b]
                items.append(
                    f"{a}-{b}={self.intra if same else self.inter_shape(party[a], party[b])}"
                )
        return ",".join(items)


def names() -> list[str]:
    """Names of the bundled profiles."""
    here = resources.files(__package__)
    return sorted(p.name.removesuffix(".json") for p in here.iterdir() if p.name.endswith(".json"))


def load(name: str) -> Profile:
    """The bundled profile `name`; ShapeError when there is none or it does not validate."""
    if name not in names():
        raise ShapeError(f"--links: no profile @{name}; bundled: {', '.join(names())}")
    text = resources.files(__package__).joinpath(f"{name}.json").read_text("utf-8")
    try:
        return Profile.model_validate(json.loads(text))
    except (ValidationError, ValueError) as exc:
        raise ShapeError(f"profile @{name}: {exc}") from None


def resolve_links(spec: str, workers: list[str]) -> str:
    """`@name` -> the profile's spec for `workers`; any other spec is returned as is."""
    spec = spec.strip()
    if not spec.startswith("@"):
        return spec
    return load(spec[1:]).links(workers)
