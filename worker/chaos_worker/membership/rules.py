"""The membership protocol's pure rules: which proposals count, which decision wins,
what a recovery builds on. `protocol.Membership` applies them; they touch no state."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from chaos_planner.tree import connected_components

from chaos_worker.membership.view import Change, View, link_ends, link_key
from chaos_worker.net.wire import Decision, Proposal

IMMEDIATE = frozenset({"crash", "link_down", "reset"})
"""Proposals that may abort the step in flight: only the members of the current epoch
may make them (`fenced`)."""


def relevant(view: View, proposal: Proposal) -> bool:
    """Planned proposals that still change something in `view`."""
    if proposal.kind == "join":
        new = proposal.subject not in view.members and proposal.mode != "observe"
        reached = any(link_key(m, proposal.subject) not in view.down for m in view.members)
        return new and reached
    if proposal.kind == "leave":
        return proposal.subject in view.members
    is_down = link_key(proposal.subject, proposal.peer) in view.down
    if proposal.kind == "link_up":
        return is_down
    if proposal.kind == "link_down":
        ends = proposal.subject in view.members and proposal.peer in view.members
        return ends and not is_down
    return False


def ready_wait(
    proposals: Iterable[Proposal], received_at: Mapping[str, float], now: float
) -> float:
    """Seconds from `now` until the slowest newcomer asking to switch in is ready."""
    waits = [
        p.ready_in_s - (now - received_at.get(p.id, now))
        for p in proposals
        if p.kind == "join" and p.mode == "ready"
    ]
    return max([0.0, *waits])


def moot(view: View, proposals: Iterable[Proposal]) -> list[str]:
    """Ids of open proposals `view` makes moot: planned ones it settles (a leave done, a
    join admitted, a link already down or up), which decided later would undo a change
    made since (the other end's `link_down` would cut a healed link, a stale join re-admit
    a removed member), and suspicions of an earlier epoch (those a member made before it
    was removed would otherwise take healthy members out of a recovery after its rejoin).
    Observer joins wait for their shard plan and are never moot here."""
    planned = ("leave", "link_up", "link_down", "join")
    return [
        p.id
        for p in proposals
        if (p.kind in planned and p.mode != "observe" and not relevant(view, p))
        or (p.kind in IMMEDIATE and p.epoch < view.epoch)  # stale: fenced if it came now
    ]


def reachable(view: View, me: str, suspects: Iterable[str], down: Iterable[str]) -> set[str]:
    """Members of `view` that `me` reaches over links not `down`, suspects excluded."""
    alive = set(view.members) - set(suspects)
    dead = set(down)
    edges = {
        (a, b): 1.0
        for key in view.overlay
        if key not in dead
        for a, b in [link_ends(key)]
        if a in alive and b in alive
    }
    components = connected_components(alive | {me}, edges)
    return set(next(c for c in components if me in c))


def recovery_base(
    view: View, planned: Iterable[Decision | None], latest: int
) -> tuple[View, set[str]]:
    """The view in force for step `latest + 1`, and the proposals it already covers.

    Planned decisions (in epoch order) effective at or before that step have been
    installed by the members that got there, so the recovery builds on the last of them
    rather than on the older view.
    """
    due = [d for d in planned if d is not None and d.effective_step <= latest + 1]
    if due:
        return due[-1].view, {c.id for d in due for c in d.causes}
    return view, set()


def fenced(
    view: View, suspects: Iterable[str], proposal: Proposal, pending: View | None = None
) -> str | None:
    """Why `proposal` must change nothing in `view` (None: it may).

    Only members of the current epoch may abort it: a crash, link-down or reset from a
    member removed since (it still runs an older view), from a member this one suspects,
    or made in an earlier epoch is stale. A member leaves, and reports its links, only
    for itself. A newcomer of the `pending` view may withdraw (a confirmed crash of its
    own) before that view is in force.
    """
    if proposal.kind == "join":
        return None
    withdrawn = proposal.kind == "crash" and proposal.confirmed
    if (
        withdrawn
        and proposal.origin == proposal.subject
        and proposal.origin in (pending.members if pending is not None else ())
    ):
        return None
    if proposal.origin not in view.members and proposal.kind != "link_up":
        return f"{proposal.origin} is not a member of epoch {view.epoch}"
    if proposal.kind in ("leave", "link_up") and proposal.subject != proposal.origin:
        return f"{proposal.origin} speaks for {proposal.subject}"
    if proposal.kind not in IMMEDIATE:
        return None
    if proposal.origin in suspects:
        return f"{proposal.origin} is suspected here"
    if proposal.epoch < view.epoch:
        return f"made in epoch {proposal.epoch}, before epoch {view.epoch}"
    return None


def preferred(held: Decision | None, new: Decision) -> Decision:
    """The one of two immediate decisions every member takes, whatever the order they
    arrive in: the later epoch; then a view that trains over a paused one, the larger
    view, the smaller coordinator id, the smaller decision id."""
    if held is None:
        return new

    def rank(d: Decision) -> tuple:
        return (-d.view.epoch, d.view.paused, -len(d.view.members), d.origin, d.id)

    return min(held, new, key=rank)


def on_tree(view: View, a: str, b: str) -> bool:
    return view.parent.get(a) == b or view.parent.get(b) == a


def change_of(proposal: Proposal) -> Change:
    if proposal.kind == "crash":
        return crash_change(proposal.subject, proposal.confirmed)
    return Change(proposal.kind, proposal.subject, proposal.peer, proposal.address)


def crash_change(member: str, confirmed: bool) -> Change:
    """A confirmed crash leaves the majority's count; a suspect stays in it."""
    return Change("crash" if confirmed else "suspect", member)
