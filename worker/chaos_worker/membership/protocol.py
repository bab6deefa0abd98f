"""The membership protocol: proposals, decisions, recovery rounds, partitions, rejoins.

Every change takes effect at a step boundary. Planned changes (leave, join, link up, link
down off the tree) are decided by the epoch's root and flooded ahead of the totals they
must precede. Immediate changes (crash, reset, link down on the tree) abort the step in
flight; the recovery coordinator (the smallest id not suspected on its side) decides the
next view and the aborted step is replayed or redone. Only the side with the majority of
the previous epoch's throughput goes on, never a paused minority's view (`outvoted`); a
member paused or removed asks back. The rules and reasons: `docs/runtime.md` (`rules.py`).

`Membership` holds this member's part: it sends through an `Outbox`, reads a `Clock` (or a
call's `now`), tells the others through `Listeners`, and never touches the transport or the
model. Recovery: it decides and installs (`recover`); the trainer replays.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Callable
from typing import Any

from chaos_worker.membership.listeners import Listeners
from chaos_worker.membership.planned import Planned
from chaos_worker.membership.readiness import switch_steps
from chaos_worker.membership.recovery import RecoveryRound
from chaos_worker.membership.rules import (
    IMMEDIATE,
    change_of,
    crash_change,
    expected,
    fenced,
    moot,
    on_tree,
    outvoted,
    preferred,
    reachable,
    ready_wait,
    recovery_base,
    relevant,
)
from chaos_worker.membership.seen import Flooded
from chaos_worker.membership.view import View, link_key, next_view
from chaos_worker.net.bounds import Reject
from chaos_worker.net.wire import Cause, Decision, MemberStatus, Proposal
from chaos_worker.ports import Clock, Outbox, Progress, Signal
from chaos_worker.telemetry.telemetry import Telemetry

log = logging.getLogger(__name__)

# Decisions are flooded on the same FIFO links as the all-reduce, and forwarded on receipt.
# One the root sends before the down-pass of step s reaches every member before the totals
# of s, so it can take effect at s + 1; after that down-pass has begun, at s + 2 (always in
# time). The planner's `switch_step` is for decisions that travel outside the data path.
FIFO_SWITCH_MARGIN = 2

RECOVERY_PATIENCE = 2.0
"""Failure timeouts a member waits for a recovery decision before it takes itself for the
one cut off, leaves the view and asks to be admitted again."""


class Membership:
    """This member's view of the job and its part in changing it."""

    def __init__(
        self,
        me: str,
        *,
        outbox: Outbox,
        clock: Clock,
        progress: Progress,
        telemetry: Telemetry,
        failure_timeout_s: float,
        down_sent: Callable[[], tuple[int, int] | None] = lambda: None,
        listeners: Listeners | None = None,
        reject: Reject | None = None,
    ) -> None:
        """`down_sent()`: (epoch, step) of the last all-reduce whose totals this member,
        as root, began to send down (`TreeAllReduce.down_sent`)."""
        self.me = me
        self.view: View | None = None
        self.view_step = -1  # the step the view in force took effect at (`View.shares`)
        self._planned = Planned()
        self.aborting = False
        self.leaving = False
        self.suspects: set[str] = set()
        self.confirmed: set[str] = set()  # suspects known to be dead (`Proposal.confirmed`)
        self.speeds: dict[str, float] = {}  # member -> speed its latest heartbeat announced
        self.listeners = listeners or Listeners()
        self._out = outbox
        self._clock = clock
        self._progress = progress
        self._telemetry = telemetry
        self._failure_timeout_s = failure_timeout_s
        self._down_sent = down_sent
        self._changed = Signal()
        self._seen = Flooded(reject)
        self._open: dict[str, Proposal] = {}
        self._received_at: dict[str, float] = {}  # proposal id -> when it arrived here
        self._immediate: Decision | None = None
        self._recovery: RecoveryRound | None = None
        self._floor_epoch = 0
        self._asked_back = False
        self.addresses: dict[str, str] = {}  # member -> address seen: where to ask back
        self.silence: Callable[[str, float], float] = lambda _member, _now: math.inf
        """Seconds since this member last heard from another (set by `Liveness`)."""

    @property
    def pending(self) -> Decision | None:
        """The next planned decision agreed and not yet in force."""
        return self._planned.next

    async def changed(self, timeout: float | None = None) -> None:
        """Until the protocol's state changes (a decision, an abort, a status, a view), or
        `timeout` seconds."""
        await self._changed.wait(timeout)

    def begin(self, view: View) -> None:
        """Start as a member of the job's first view."""
        self.view = view
        self.addresses.update(view.members)

    def heard_speed(self, member: str, samples_per_s: float) -> None:
        self.speeds[member] = samples_per_s

    def expects(self, sender: str, epoch: int, step: int) -> bool:
        """Whether a bucket from `sender` for (`epoch`, `step`) may come (`rules.expected`)."""
        held = [d for d in (*self._planned.all(), self._immediate) if d is not None]
        return expected(self.view, held, self._progress.step, sender, (epoch, step))

    # ------------------------------------------------------------------ proposals

    def propose(self, kind: str, subject: str, now: float, *, peer: str = "") -> None:
        """Propose a change this member observed (a leave, a link going down or up)."""
        epoch = self.view.epoch if self.view else -1
        proposal = self._mine(
            f"{kind}:{subject}:{peer}:{uuid.uuid4().hex[:8]}", kind, subject, now, epoch, peer=peer
        )
        self._out.report("detected", event=kind, subject=subject, peer=peer, t=now, id=proposal.id)
        self.on_proposal(proposal, now)

    def _mine(
        self, key: str, kind: str, subject: str, now: float, epoch: int, **extra: Any
    ) -> Proposal:
        """A proposal this member makes (`key`: its id)."""
        return Proposal(
            id=key,
            origin=self.me,
            kind=kind,
            subject=subject,
            detected_at=now,
            epoch=epoch,
            **extra,
        )

    def leave(self, now: float) -> None:
        """Ask to leave at an agreed step (once)."""
        if self.view is not None and not self.leaving:
            self.leaving = True
            self.propose("leave", self.me, now)

    def announce(self, proposal: Proposal) -> None:
        """Flood a proposal of this member's own join, which it has nothing to decide on."""
        self._seen.first(proposal)
        self._out.flood(proposal)

    def suspect(self, member: str, now: float, *, confirmed: bool = False) -> None:
        """A member looks dead (`confirmed`: it is, its address refused a connection):
        tell everybody and abort the step in flight."""
        if self.view is None or member not in self.view.members or member in self.suspects:
            return
        epoch = self.view.epoch
        # one id per origin: a refused suspicion must not hide another
        key = f"crash:{member}:{epoch}:{self.me}" + ("!" if confirmed else "")
        proposal = self._mine(key, "crash", member, now, epoch, confirmed=confirmed)
        self._out.report("detected", event="crash", subject=member, t=now)
        self.on_proposal(proposal, now)

    def reset(self, peer: str, now: float) -> None:
        """The connection from a live `peer` broke: frames of the step in flight may be
        lost, so the step is aborted and redone (the view does not change)."""
        if self.view is None or peer not in self.view.members:
            return
        epoch = self.view.epoch
        key = f"reset:{link_key(self.me, peer)}:{epoch}"
        proposal = self._mine(key, "reset", self.me, now, epoch, peer=peer)
        self._out.report("detected", event="reset", subject=self.me, peer=peer, t=now)
        self.on_proposal(proposal, now)

    def on_proposal(self, proposal: Proposal, now: float) -> None:
        """Take a proposal in (once), forward it, and act on it (unless `fenced`)."""
        if not self._seen.first(proposal):
            return
        if self.view is not None and not self.view.paused and proposal.mode != "probe":
            pending = self.pending.view if self.pending is not None else None
            why = fenced(self.view, self.suspects, proposal, pending)
            if why is None and proposal.kind == "crash" and not proposal.confirmed:
                heard = self.silence(proposal.subject, now)
                why = None if heard >= self._failure_timeout_s / 2 else "heard from it lately"
            if why is not None:
                log.info("ignoring %s from %s: %s", proposal.id, proposal.origin, why)
                return
        if proposal.kind == "join" and proposal.address:
            self._out.connect(proposal.subject, proposal.address)
        self._out.flood(proposal)
        if proposal.kind == "join" and proposal.links:
            subject = proposal.subject
            self._telemetry.merge_links(proposal.links, lambda _src, dst: dst == subject)
        if self.view is None or proposal.mode == "probe":
            return
        if self.view.paused:  # not training: only a way back matters
            if proposal.kind == "link_up":
                self._ask_back()
            return
        if proposal.kind == "crash" and proposal.subject == self.me:
            return  # falsely suspected: the others' recovery view leaves us out, we rejoin
        self._open[proposal.id] = proposal
        self._received_at[proposal.id] = now
        self._take(proposal, now)

    def _take(self, proposal: Proposal, now: float) -> None:
        """Act on an open proposal: an immediate change aborts, a planned one may be decided."""
        if proposal.kind == "crash":
            self.suspects.add(proposal.subject)
            if proposal.confirmed:
                self.confirmed.add(proposal.subject)
            self._begin_abort(now)
        elif proposal.kind == "reset" or (
            proposal.kind == "link_down" and on_tree(self.view, proposal.subject, proposal.peer)
        ):
            self._begin_abort(now)
        else:
            self._maybe_decide(now)
        self._changed.notify()

    def _abort_again(self, now: float) -> None:
        """Just recovered into a new epoch: abort it for each immediate proposal made in it
        that came while this member still recovered (the others, already in it, did)."""
        for proposal in list(self._open.values()):
            if proposal.kind in IMMEDIATE and not fenced(self.view, self.suspects, proposal):
                self._take(proposal, now)

    # ------------------------------------------------------------------ planned changes

    async def at_boundary(self) -> bool:
        """Install what takes effect at this step; True when this member leaves (it asked
        to). A member removed without asking pauses and asks to be admitted again; while
        paused (also in a minority), waits here until a view takes it back."""
        while True:
            if self.aborting:
                return False
            step = self._progress.step
            while (
                (pending := self.pending) is not None
                and not self.view.paused
                and pending.effective_step <= step
            ):
                self.install(pending, self._clock())
            if self.me not in self.view.members:
                if self.leaving:
                    return True
                if not self.view.paused:
                    self._outcast("removed from the view", self._clock())
            if not self.view.paused:
                self._maybe_decide(self._clock())
                return False
            if not self._asked_back:
                self._ask_back()
            await self._changed.wait()

    def _outcast(self, reason: str, now: float) -> None:
        """This member is not in the view in force (suspected while it was only slow or
        cut off): it stops contributing and pauses until a view admits it again."""
        view = self.view
        self.view = view.model_copy(update={"paused": True})
        self._planned.clear()
        self._out.report(
            "evicted", reason=reason, epoch=view.epoch, members=sorted(view.members), t=now
        )
        self._telemetry.evicted("removed")
        self._view_installed()

    def _ask_back(self) -> None:
        """Ask to be admitted again (the listener retries by itself until admitted)."""
        self._asked_back = True
        for rejoin in self.listeners.rejoin:
            rejoin()

    def _maybe_decide(self, now: float) -> None:
        """As root, plan joins and turn open planned proposals into the next view."""
        if self.view.root != self.me or self.aborting:
            return
        self._plan_joins()
        if self.pending is not None:
            return
        proposals = [p for p in self._open.values() if relevant(self.view, p)]
        if not proposals:
            return
        changes = [change_of(p) for p in proposals]
        leaving = {c.subject for c in changes if c.kind == "leave"}
        staying = [m for m in sorted(self.view.members) if m not in leaving] or [self.me]
        side_of = self.me if self.me in staying else staying[0]
        outcome = next_view(self.view, changes, side_of=side_of, speeds=self._speed_table())
        wait_s = ready_wait(proposals, self._received_at, now)
        decision = Decision(
            id=uuid.uuid4().hex,
            origin=self.me,
            view=outcome.view,
            effective_step=self._progress.step + self._switch_margin(wait_s, now),
            immediate=False,
            causes=[Cause.of(p) for p in proposals],
        )
        self.on_decision(decision, now)

    def _plan_joins(self) -> None:
        """As root, give every newcomer that asked to observe a shard plan (once)."""
        plan_join = self.listeners.plan_join
        leaving = {p.subject for p in self._open.values() if p.kind == "leave"}
        for key, proposal in list(self._open.items()):
            if proposal.kind != "join" or proposal.mode != "observe":
                continue
            admitted = proposal.subject in self.view.members
            if not admitted and (plan_join is None or not plan_join(proposal, self.view, leaving)):
                return  # no snapshot to plan from yet
            del self._open[key]

    def _switch_margin(self, wait_s: float, now: float) -> int:
        """Steps ahead a decision taken now takes effect: at least one while this step's
        totals have not left the root (the decision travels ahead of them), else
        `FIFO_SWITCH_MARGIN`; and not before `wait_s` from now (readiness.py)."""
        ahead = self._down_sent() != (self.view.epoch, self._progress.step)
        minimum = 1 if ahead else FIFO_SWITCH_MARGIN
        progress = self._progress
        return switch_steps(now, progress.started, progress.period(), wait_s, minimum)

    def _speed_table(self) -> dict[str, float]:
        speeds = dict(self.view.speeds)
        speeds.update({m: s for m, s in self.speeds.items() if s > 0})
        if self._progress.samples_per_s > 0:
            speeds[self.me] = self._progress.samples_per_s
        return speeds

    def on_decision(self, decision: Decision, now: float) -> None:
        """Take a decision in (once), forward it, and schedule or start it."""
        if not self._seen.first(decision):
            return
        view = decision.view
        stale = self.view is not None and view.epoch <= self.view.epoch and not self.view.paused
        if stale and not decision.immediate:
            return
        self.addresses.update(view.members)
        neighbours = set(view.neighbours(self.me))
        for member, address in view.members.items():
            if member != self.me and member in neighbours:
                self._out.connect(member, address)
        self._out.flood(decision)
        self._out.report(
            "agreed",
            decision=decision.id,
            epoch=view.epoch,
            effective_step=decision.effective_step,
            members=sorted(view.members),
            paused=view.paused,
            causes=[f"{c.kind}:{c.subject}" for c in decision.causes],
            t=now,
        )
        if self.view is None:
            for joining in self.listeners.joining:
                joining(decision)
        else:
            self._telemetry.stall.change_started()
        if decision.immediate:
            if outvoted(self.view, decision, self.me) and not self.leaving:
                for member in view.members:  # paused: none will train or report a status
                    self.suspect(member, now, confirmed=True)
            elif self.view is None or view.epoch > self.view.epoch:
                self._immediate = preferred(self._immediate, decision)
                removed = self.me not in self._immediate.view.members and not self.leaving
                if removed and self.view is not None and not self.view.paused:
                    self._begin_abort(now)  # stop contributing at once; recover() installs it
        else:
            copying = self.view is not None and self.view.paused  # from its first admission
            self._planned.add(decision, replace=copying and not self._planned.admits(self.me))
        self._changed.notify()

    def install(self, decision: Decision, now: float, *, send_state: bool = True) -> None:
        """Adopt the view of a planned decision at its effective step."""
        old = self.view
        self.view = decision.view
        self.view_step = decision.effective_step
        self._planned.drop_through(decision.view.epoch)
        for cause in decision.causes:
            self._open.pop(cause.id, None)
            self._received_at.pop(cause.id, None)
        joiners = [m for m in self.view.members if old is None or m not in old.members]
        for admitted in self.listeners.admitted:
            admitted(decision, old, joiners, send_state)
        self._view_installed()
        self._report_installed(decision, now)

    def _drop_settled(self) -> None:
        """Forget open planned proposals the view in force makes moot (`rules.moot`)."""
        for key in moot(self.view, self._open.values()):
            del self._open[key]
            self._received_at.pop(key, None)

    def _view_installed(self) -> None:
        self._seen.installed(self.view.epoch)
        self._drop_settled()
        self._asked_back = self._asked_back and self.view.paused
        for installed in self.listeners.installed:
            installed()
        self._telemetry.stall.change_installed()
        self._changed.notify()

    def _report_installed(self, decision: Decision, now: float) -> None:
        """Tell the launcher that the view of `decision` is now in force here."""
        self._telemetry.observe_decision(decision)
        self._out.report(
            "installed",
            decision=decision.id,
            epoch=self.view.epoch,
            step=self._progress.step,
            members=len(self.view.members),
            paused=self.view.paused,
            t=now,
        )

    # ------------------------------------------------------------------ recovery

    def _begin_abort(self, now: float) -> None:
        self._telemetry.stall.change_started()
        if not self.aborting:
            self.aborting = True
            if self._recovery is None or self._recovery.decided:
                self._recovery = RecoveryRound(started=now)
            else:  # statuses came first, from members ahead: kept, the timeout counts anew
                self._recovery.started = now
        for aborting in self.listeners.aborting:
            aborting()
        self._changed.notify()

    def report_status(self) -> None:
        """Tell the coordinator how far this member got (once a round): the trainer calls
        it once its completed steps cannot change, maybe before its compute has returned."""
        epoch = self.view.epoch
        status = MemberStatus(
            id=f"status:{self.me}:{epoch}:{len(self.suspects)}",
            origin=self.me,
            epoch=epoch,
            round=len(self.suspects),
            completed=self._progress.completed,
        )
        self.on_status(status, self._clock())

    async def recover(self) -> Decision:
        """Report progress to the coordinator (unless already reported this round), wait
        for the recovery decision and install its view; the trainer then replays the
        aborted step (`Trainer.replay`) and calls `recovered`."""
        epoch = self.view.epoch
        self.report_status()
        give_up = self._clock() + RECOVERY_PATIENCE * self._failure_timeout_s
        while self._immediate is None or self._immediate.view.epoch <= epoch:
            change = self._changed.next()  # before acting: a change made here counts too
            now = self._clock()
            self.try_decide_recovery(now)
            if self._immediate is not None and self._immediate.view.epoch > epoch:
                break
            if now >= give_up:  # nobody decides for us: we are the one cut off
                self._leave_now(now)
                break
            deadline = self._recovery_deadline(now)
            wait = give_up - now if deadline is None else min(deadline, give_up - now)
            await self._changed.wait(wait, since=change)
        decision = self._immediate
        self._immediate = None
        view = decision.view
        for cause in decision.causes:
            self._open.pop(cause.id, None)
        self.suspects.clear()
        self.confirmed.clear()
        self._planned.drop_through(view.epoch)  # planned before the abort: recovery replaces it
        now = self._clock()
        self._recovery = self._recovery.ahead(view.epoch, now) if self._recovery else None
        self.aborting = False
        self._floor_epoch = view.epoch
        self.view = view
        self.view_step = decision.effective_step
        self._view_installed()
        self._abort_again(now)
        return decision

    def withdraw(self, decision: Decision, now: float) -> None:
        """A member `decision` admits that cannot take its place says it is gone (none waits)."""
        self._gone(decision.view.epoch, now)
        self._planned.drop_through(decision.view.epoch)  # a later decision may admit it again
        self._out.report("detected", event="crash", subject=self.me, t=now, reason="withdrawn")

    def _gone(self, epoch: int, now: float) -> None:
        """Flood a confirmed crash of this member's own: the others drop it at once."""
        proposal = self._mine(
            f"crash:{self.me}:{epoch}:{self.me}!", "crash", self.me, now, epoch, confirmed=True
        )
        self._seen.first(proposal)
        self._out.flood(proposal)

    def _leave_now(self, now: float) -> None:
        """No recovery decision came: this member is the one the others cannot reach (or
        that cannot reach them). It tells them it is gone and pauses outside the view
        until admitted again."""
        view = self.view
        pending = self.pending  # members already in it take an older epoch's crash for stale
        ahead = pending is not None and self.me in pending.view.members
        self._gone(pending.view.epoch if ahead else view.epoch, now)
        others = {m: a for m, a in view.members.items() if m != self.me}
        self._immediate = Decision(
            id=f"out:{self.me}:{view.epoch}",
            origin=self.me,
            view=view.model_copy(update={"members": others, "paused": True}),
            effective_step=self._progress.step,
            immediate=True,
        )
        waited = RECOVERY_PATIENCE * self._failure_timeout_s
        reason = f"no recovery decision within {waited:g} s"
        self._out.report("evicted", reason=reason, epoch=view.epoch, members=sorted(others), t=now)
        self._telemetry.evicted("no_decision")

    def _recovery_deadline(self, now: float) -> float | None:
        """Seconds until the coordinator suspects the members that have not reported."""
        recovery = self._recovery
        if recovery is None or recovery.decided:
            return None
        left = recovery.started + self._failure_timeout_s - now
        return left + 1e-3 if left >= 0 else None

    def recovered(self, decision: Decision, now: float) -> None:
        """The recovery of `decision` is complete here (replayed, at its step)."""
        self._report_installed(decision, now)
        if self.view.paused and self.me in self.view.members:
            members = sorted(self.view.members)
            self._out.report("paused", reason="partition minority", members=members, t=now)

    def on_status(self, status: MemberStatus, now: float) -> None:
        if not self._seen.first(status):
            return
        self._out.flood(status)
        if self.view is None or status.epoch < self._floor_epoch:
            return
        if self._recovery is None:
            self._recovery = RecoveryRound(started=now)
        self._recovery.statuses[status.origin] = status.completed
        self._recovery.epochs[status.origin] = status.epoch
        self._changed.notify()
        if self.aborting:  # as coordinator, decide once the last status is in, even while
            self.try_decide_recovery(now)  # its own compute still runs (not in `recover`)

    def try_decide_recovery(self, now: float) -> None:
        """As coordinator, decide the recovery view once every live member has reported
        (or suspect those that have not within the failure timeout); not once it holds
        a recovery decision of a later epoch (one that may leave it out)."""
        if self._recovery is None or self.view is None or self._recovery.decided:
            return
        if self._immediate is not None and self._immediate.view.epoch > self.view.epoch:
            return
        statuses = self._recovery.statuses
        latest = max(statuses.values(), default=self._progress.completed)
        base, done = recovery_base(self.view, self._planned.all(), latest)
        down = {link_key(p.subject, p.peer) for p in self._open.values() if p.kind == "link_down"}
        side = reachable(base, self.me, self.suspects, down | set(base.down))
        if min(side) != self.me:
            return
        missing = [m for m in side if m not in statuses]
        if missing:
            if now - self._recovery.started > self._failure_timeout_s:
                for member in missing:
                    self.suspect(member, now)
            return
        latest = max(statuses[m] for m in side)
        holders = [m for m in side if statuses[m] == latest]
        lagging = any(statuses[m] < latest for m in side)
        proposals = [p for p in self._open.values() if p.kind != "join" and p.id not in done]
        changes = [change_of(p) for p in proposals]
        changes += [
            crash_change(m, m in self.confirmed) for m in self.suspects if m in base.members
        ]
        outcome = next_view(
            base, changes, side_of=self.me, speeds=self._speed_table(), root_candidates=holders
        )
        decision = Decision(
            id=uuid.uuid4().hex,
            origin=self.me,
            view=outcome.view,
            effective_step=latest + 1,
            immediate=True,
            replay_step=latest if lagging else None,
            causes=[Cause.of(p) for p in proposals],
        )
        self._recovery.decided = True
        self.on_decision(decision, now)
