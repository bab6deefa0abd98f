"""The membership protocol's pure rules: which proposals count, which decision wins,
what a recovery builds on. `protocol.Membership` applies them; they touch no state."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from chaos_planner.tree import connected_components

from chaos_worker.membership.view import Change, View, link_ends, link_key
from chaos_worker.net.wire import Decision, JoinPlan, Proposal

IMMEDIATE = frozenset({"crash", "link_down", "reset"})
"""Proposals that may abort the step in flight: only the members of the current epoch
may make them (`fenced`)."""


def expected(
    view: View | None, held: list[Decision], step: int, sender: str, op: tuple[int, int]
) -> bool:
    """Whether an all-reduce bucket from `sender` for `op` (epoch, step) may come to a
    member in `view`, holding decisions `held` not yet in force, at `step`: the sender is
    a member of one of those views, the epoch no later than theirs (a decision precedes the
    buckets of its epoch on every FIFO link) and the step at most one past the furthest
    known (a child may start the next step before this member has applied the last)."""
    views = [d.view for d in held] + ([view] if view is not None else [])
    last = max([step, *(d.effective_step for d in held)])
    newest = max((v.epoch for v in views), default=-1)
    return op[0] <= newest and op[1] <= last + 1 and any(sender in v.members for v in views)


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


def outvoted(held: View | None, decision: Decision, me: str) -> bool:
    """Whether `decision` is a minority's recovery that paused it and left out `me`,
    whose view (`held`) trains: taking it would stop both sides, and nobody would be left
    to admit anybody again. The minority has stopped training, so `me` takes its members
    for gone (a confirmed crash) and its side recovers without them; they ask back as any
    paused member does."""
    if held is None or held.paused or decision.view.epoch <= held.epoch:
        return False
    return decision.immediate and decision.view.paused and me not in decision.view.members


def on_tree(view: View, a: str, b: str) -> bool:
    return view.parent.get(a) == b or view.parent.get(b) == a


def change_of(proposal: Proposal) -> Change:
    if proposal.kind == "crash":
        return crash_change(proposal.subject, proposal.confirmed)
    return Change(proposal.kind, proposal.subject, proposal.peer, proposal.address)


def crash_change(member: str, confirmed: bool) -> Change:
    """A confirmed crash leaves the majority's count; a suspect stays in it."""
    return Change("crash" if confirmed else "suspect", member)


SELF_SPOKEN = frozenset({"leave", "link_down", "link_up", "join", "reset"})
"""Proposals a member makes only about itself: its leave, its links, its join, a reset of
its own connection (`subject` is the proposer; `peer` the other end)."""


def speaks_for_another(proposal: Proposal) -> str | None:
    """Why `proposal` must be refused from whoever signed it (its origin): a leave, link
    change, join or reset made for another member. None: it may be made."""
    if proposal.kind in SELF_SPOKEN and proposal.subject != proposal.origin:
        return f"{proposal.origin} speaks for {proposal.subject} ({proposal.kind})"
    return None


def undue_decision(decision: Decision, known: list[View]) -> str | None:
    """Why `decision` cannot come from its origin (None: it may), judged by the views
    this member knows (`known`: in force and planned; none when it holds no view or is
    paused). A decision of epoch e replaces a view of epoch e - 1: a planned one is made
    by that view's root, an immediate one (a recovery) by a member of it (the coordinator
    of its side). When no known view has epoch e - 1 (this member is behind), the origin
    must at least be a member of a known view or of the view decided."""
    if not known:
        return None
    bases = [v for v in known if v.epoch == decision.view.epoch - 1]
    origin = decision.origin
    if not bases:
        if any(origin in v.members for v in (*known, decision.view)):
            return None
        return f"{origin} is a member of no view known here"
    if decision.immediate and any(origin in b.members for b in bases):
        return None
    if not decision.immediate and any(origin == b.root for b in bases):
        return None
    who = "a member" if decision.immediate else "the root"
    return f"{origin} is not {who} of epoch {bases[0].epoch}"


def undue_plan(plan: JoinPlan, known: list[View]) -> str | None:
    """Why a join plan cannot come from its origin: it is made by a root, so by a member
    of a view this member knows (when it knows any)."""
    if known and not any(plan.origin in v.members for v in known):
        return f"{plan.origin} is a member of no view known here"
    return None


def joining(decision: Decision) -> set[str]:
    """The members `decision` admits: the subjects of its join causes."""
    return {c.subject for c in decision.causes if c.kind == "join"}


def state_source(decision: Decision) -> str:
    """Who sends the state to the `copy` joiners of `decision`, and whose seal they take
    it with: the root of its view, or the smallest member that does not join if the root
    joins itself (its origin if every member joins). Both sides judge it from the
    decision alone, which its origin sealed."""
    view, new = decision.view, joining(decision)
    if view.root not in new:
        return view.root
    return min((m for m in view.members if m not in new), default=decision.origin)


def state_witness(decision: Decision) -> str | None:
    """Who vouches, beside the state source, for the state the `copy` joiners of `decision`
    take (`StateWitness`): the smallest member that neither joins nor sends the state;
    None when there is no such member."""
    others = set(decision.view.members) - joining(decision) - {state_source(decision)}
    return min(others, default=None)
