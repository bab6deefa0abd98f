"""Warm spares of a local run (`chaos run --spares N`): which worker to start next.

A spare is a worker process started ahead under the name of a member to come: it imports
torch, builds the model, starts its replicator, listens and connects to the launcher, then
waits in standby (`WorkerConfig.standby`) until the launcher orders it to join. It is not a
trainer until then: no view holds it, it takes no samples and no tree edge, and losing one
is no membership event (the launcher starts another under the same name).

`SparePool` is the bookkeeping only; `LocalRun` starts and orders the processes. Spares
take the names of the schedule's joiners in schedule order, then fresh names, so a join
finds its spare under the name the schedule gave it. The pool is topped up only once the
spare last ordered to join has joined: a spare starting meanwhile would take the cores
that its transfer and the trainers need.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_NUMBERED = re.compile(r"w(\d+)")


@dataclass
class SparePool:
    """Spares wanted (`size`), and the state of every name the pool has used."""

    size: int
    names: list[str]  # names still free for a spare, in the order they will be needed
    fresh_after: int | None = None  # once `names` are used: w<k> for k past this (None: none)
    waiting: list[str] = field(default_factory=list)  # started, not yet ordered to join
    joining: set[str] = field(default_factory=set)  # ordered to join, not yet joined
    used: list[str] = field(default_factory=list)  # ordered to join, in order
    lost: list[str] = field(default_factory=list)  # died while waiting (restarted)

    @classmethod
    def plan(cls, size: int, joiners: list[str], taken: list[str], *, fresh: bool) -> SparePool:
        """A pool of `size` spares named after `joiners` (in order), then, with `fresh`,
        after no name in `taken` or `joiners`."""
        numbers = [int(m.group(1)) for n in taken + joiners if (m := _NUMBERED.fullmatch(n))]
        return cls(size, list(joiners), max(numbers, default=-1) if fresh else None)

    def next_name(self) -> str | None:
        """The name to start a spare under now, or None (the pool is full, a spare is
        still joining, or no name is left)."""
        if len(self.waiting) >= self.size or self.joining:
            return None
        if self.names:
            return self.names[0]
        if self.fresh_after is None:
            return None
        return f"w{self.fresh_after + 1}"

    def started(self, name: str) -> None:
        """A spare was started under `name` (the one `next_name` gave)."""
        if self.names and self.names[0] == name:
            self.names.pop(0)
        elif self.fresh_after is not None and name == f"w{self.fresh_after + 1}":
            self.fresh_after += 1
        self.waiting.append(name)

    def claim(self, name: str) -> bool:
        """A join wants `name`: True if a spare waits under it (it is now joining);
        otherwise the name is taken out of the pool (the joiner starts cold)."""
        if name in self.names:
            self.names.remove(name)
        if name not in self.waiting:
            return False
        self.waiting.remove(name)
        self.joining.add(name)
        self.used.append(name)
        return True

    def joined(self, name: str) -> None:
        """The spare `name` has joined (or ended): the pool may start the next one."""
        self.joining.discard(name)

    def lose(self, name: str) -> None:
        """The waiting spare `name` died: it is started again first, under the same name."""
        if name in self.waiting:
            self.waiting.remove(name)
            self.lost.append(name)
            self.names.insert(0, name)

    def report(self) -> dict:
        """The report's `spares` section."""
        return {"pool": self.size, "used": self.used, "lost": self.lost, "unused": self.waiting}
