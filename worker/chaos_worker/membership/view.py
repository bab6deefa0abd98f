"""Membership views and the pure rules that turn observed changes into the next view.

A view is everything a member needs to run epoch `epoch`: who the members are, their
addresses and measured speeds, the overlay (links that may carry traffic) and the
aggregation tree. Every member of an epoch holds the same view, so every split of work
and every route is computed identically everywhere.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Annotated

from chaos_planner.tree import Tree, connected_components, maximum_spanning_tree, repair_tree
from pydantic import BaseModel, ConfigDict, Field


def link_key(a: str, b: str) -> str:
    """Canonical name of the undirected link between `a` and `b`."""
    return "|".join(sorted((a, b)))


def link_ends(key: str) -> tuple[str, str]:
    a, _, b = key.partition("|")
    return a, b


FIRST_STEP_SHARE = 0.5
"""A newcomer's share of its first step, relative to its speed (`View.shares`)."""


class View(BaseModel):
    """One membership epoch, identical on every member (a decision carries it on the wire:
    every number is finite and in range)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    epoch: int = Field(0, ge=0, le=2**53 - 1)
    members: dict[str, str]
    speeds: dict[str, Annotated[float, Field(ge=0)]]
    overlay: dict[str, Annotated[float, Field(ge=0)]] = Field(
        description="link key -> bandwidth estimate (bytes/s)"
    )
    down: list[str] = Field(default_factory=list, description="link keys that are down")
    root: str
    parent: dict[str, str | None]
    paused: bool = False
    joining: list[str] = Field(
        default_factory=list, description="members new in this epoch (see `shares`)"
    )

    def tree(self) -> Tree:
        return Tree(root=self.root, parent=dict(self.parent))

    def live_edges(self) -> dict[tuple[str, str], float]:
        """Overlay links between members that are up."""
        down = set(self.down)
        edges = {}
        for key, bandwidth in self.overlay.items():
            a, b = link_ends(key)
            if key not in down and a in self.members and b in self.members:
                edges[(a, b)] = bandwidth
        return edges

    def shares(self, first_step: bool) -> dict[str, float]:
        """The speeds a step's samples are split by. In the epoch's first step a member
        new in it takes `FIRST_STEP_SHARE` of its speed: it switches in a few milliseconds
        after the others (it replays the step before from the root's stream) and its
        first step runs cold, so a full share would leave the others idle, waiting for it.
        Only who computes which samples changes, never the global batch."""
        if not first_step or not self.joining:
            return dict(self.speeds)
        return {m: v * FIRST_STEP_SHARE if m in self.joining else v for m, v in self.speeds.items()}

    def neighbours(self, member: str) -> list[str]:
        """Members that `member` has a live overlay link to."""
        return sorted({b if a == member else a for a, b in self.live_edges() if member in (a, b)})


@dataclass(frozen=True)
class Change:
    """One observed change: `kind` in leave, crash (confirmed dead), suspect (silent: dead
    or cut off), join, link_down, link_up; any other kind changes nothing."""

    kind: str
    subject: str
    peer: str = ""
    address: str = ""


def initial_view(members: Mapping[str, str], overlay: Mapping[str, float]) -> View:
    """Epoch 0: every member equally fast, the tree rooted at the smallest id."""
    speeds = dict.fromkeys(members, 1.0)
    root = min(members)
    view = View(members=dict(members), speeds=speeds, overlay=dict(overlay), root=root, parent={})
    tree = maximum_spanning_tree(list(members), view.live_edges(), root)
    return view.model_copy(update={"parent": dict(tree.parent)})


def full_mesh(members: Iterable[str], bandwidth: float = 1.0) -> dict[str, float]:
    """An overlay where every pair of members may talk."""
    ids = sorted(members)
    return {link_key(a, b): bandwidth for i, a in enumerate(ids) for b in ids[i + 1 :]}


@dataclass(frozen=True)
class ViewOutcome:
    """The next view seen from one side, and whether that side may go on training."""

    view: View
    majority: bool
    removed: frozenset[str]


def next_view(
    view: View,
    changes: Iterable[Change],
    *,
    side_of: str,
    speeds: Mapping[str, float] | None = None,
    root_candidates: Iterable[str] | None = None,
) -> ViewOutcome:
    """Apply `changes` to `view` and return the view of the component holding `side_of`.

    Crashed, suspected and leaving members are dropped; joiners are added with links to
    every member unless the overlay already says otherwise, and at the median measured
    speed. Only the component holding more than half of the previous epoch's throughput
    may go on (`majority` is False on the other side): leaving members and members known
    to have crashed are not counted in the total, but suspects are, since a member that
    is merely cut off may be training on the other side (exact arithmetic; an exact half
    goes to the side holding the smallest id). The tree is repaired, keeping every tree
    edge that is still valid; the root stays unless it is gone (then the fastest of
    `root_candidates`, or of the component, takes over). When nobody is left (every
    member leaves), the view is empty and has no root.
    """
    changes = list(changes)
    members = dict(view.members)
    overlay = dict(view.overlay)
    down = set(view.down)
    gone: set[str] = set()  # not counted in the majority
    dropped: set[str] = set()
    for change in changes:
        if change.kind in ("leave", "crash"):
            gone.add(change.subject)
            dropped.add(change.subject)
        elif change.kind == "suspect":
            dropped.add(change.subject)
        elif change.kind == "join":
            members[change.subject] = change.address
            for other in members:
                if other != change.subject:
                    overlay.setdefault(link_key(other, change.subject), 1.0)
        elif change.kind == "link_down":
            down.add(link_key(change.subject, change.peer))
        elif change.kind == "link_up":
            down.discard(link_key(change.subject, change.peer))
    for member in dropped:
        members.pop(member, None)
    known = {m: float((speeds or view.speeds).get(m, view.speeds.get(m, 0.0))) for m in members}
    measured = sorted(v for v in known.values() if v > 0)
    # a joiner has no figure yet: take it for a typical member, not an idle one
    typical = statistics.median(measured) if measured else 1.0
    new_speeds = {m: v if v > 0 else typical for m, v in known.items()}
    edges = {
        (a, b): bw
        for key, bw in overlay.items()
        if key not in down
        for a, b in [link_ends(key)]
        if a in members and b in members
    }
    components = connected_components(list(members), edges)
    side = next((c for c in components if side_of in c), set())
    counted = {m: Fraction(view.speeds.get(m, 0.0)) for m in view.members if m not in gone}
    total = sum(counted.values(), Fraction(0))
    held = sum((counted.get(m, Fraction(0)) for m in side), Fraction(0))
    smallest = min(counted) if counted else side_of
    majority = total == 0 or 2 * held > total or (2 * held == total and smallest in side)
    side_members = {m: members[m] for m in sorted(side)}
    candidates = [m for m in (root_candidates or side) if m in side] or sorted(side)
    if view.root in side and view.root in candidates:
        root = view.root
    elif candidates:
        root = min(candidates, key=lambda m: (-new_speeds.get(m, 0.0), m))
    else:
        root = ""  # nobody is left
    side_edges = {e: bw for e, bw in edges.items() if e[0] in side and e[1] in side}
    old_tree = view.tree()
    kept_nodes = [m for m in side_members if m in old_tree.nodes]
    if not side_members:
        parent: dict[str, str | None] = {}
    elif kept_nodes and view.parent:
        parent = dict(repair_tree(old_tree, list(side_members), side_edges, root).parent)
    else:
        parent = dict(maximum_spanning_tree(list(side_members), side_edges, root).parent)
    new = View(
        epoch=view.epoch + 1,
        members=side_members,
        speeds={m: new_speeds[m] for m in side_members},
        overlay=overlay,
        down=sorted(down),
        root=root,
        parent=parent,
        paused=not majority,
        joining=sorted(
            {c.subject for c in changes if c.kind == "join" and c.subject in side_members}
        ),
    )
    return ViewOutcome(view=new, majority=majority, removed=frozenset(view.members) - set(side))
