"""The incumbents' side of a join: the root's shard plan, the sources' pins, the stream of
totals to observers, and the full-state copy of a `copy` join.

A newcomer that asks to observe gets a `JoinPlan` from the root: which member's replicator
serves which shards of snapshot `step` (planned from the link figures, `join/plan.py`).
Members publish only the snapshots a join or a checkpoint asks for (`Trainer.apply`), so
`step` is one whose total has not left the root yet: the plan, flooded ahead of that
total on every path (ADR 0001), reaches every member before it could publish the
snapshot. Every source publishes it and pins it until the step in which the newcomer
switches in is reduced, and the root streams the total of every step from `step` on to the
newcomer, which replays them. A `copy` join gets the whole state in one `StateTransfer`
from one member, at the step the newcomer switches in.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from collections.abc import Callable, Coroutine, Iterable, Mapping

import numpy as np
from chaos_planner.models import Source

from chaos_worker.config import WorkerConfig
from chaos_worker.join.plan import shard_plan, source_bandwidths
from chaos_worker.membership.protocol import Membership
from chaos_worker.membership.rules import state_source, state_witness
from chaos_worker.membership.view import View
from chaos_worker.net.shaping import LinkShape, shape_for
from chaos_worker.net.wire import (
    Decision,
    JoinPlan,
    ObservedTotal,
    Proposal,
    StateTransfer,
    StateWitness,
)
from chaos_worker.ports import Clock, Outbox, Progress
from chaos_worker.replication.snapshot import (
    Layout,
    SnapshotStore,
    copy_into,
    fresh_bytes,
    layout_of,
    state_digest,
)
from chaos_worker.telemetry.telemetry import Telemetry
from chaos_worker.training.state_thread import StateThread
from chaos_worker.training.trainspec import TrainSpec

log = logging.getLogger(__name__)

DEFAULT_BANDWIDTH = 1e9
"""Bytes/s assumed for a link nobody has measured or shaped (loopback-like)."""


class JoinSponsor:
    """Plans, pins, streams and copies for the newcomers of this member's job."""

    def __init__(
        self,
        me: str,
        config: WorkerConfig,
        spec: TrainSpec,
        *,
        membership: Membership,
        replicators: Mapping[str, str],
        shapes: dict[str, LinkShape],
        store: SnapshotStore,
        telemetry: Telemetry,
        totals_sent: Callable[[], tuple[int, int] | None],
        state_thread: StateThread,
        outbox: Outbox,
        progress: Progress,
        clock: Clock,
    ) -> None:
        """`totals_sent()`: (epoch, step) of the last all-reduce whose totals this member,
        as root, began to send down (`TreeAllReduce.down_sent`); `state_thread` saves and
        digests the state a `copy` joiner gets, off the event loop."""
        self.me = me
        self.observers: dict[str, JoinPlan] = {}
        """Newcomers pulling a planned snapshot, until they switch in."""
        self._cfg = config
        self._spec = spec
        self._membership = membership
        self._replicators = replicators
        self._shapes = shapes
        self._store = store
        self._telemetry = telemetry
        self._totals_sent = totals_sent
        self._out = outbox
        self._progress = progress
        self._clock = clock
        self._seen: set[str] = set()
        self._unpin_after: dict[int, int] = {}  # pinned snapshot -> step whose end frees it
        self._state_thread = state_thread
        self._copies: set[asyncio.Task] = set()  # states and witnesses on their way out

    def plan_join(self, proposal: Proposal, view: View, leaving: Iterable[str]) -> bool:
        """As root, give a newcomer that asked to observe its shard plan (once); False
        before the first step is applied (the state's size is known from then on)."""
        if proposal.subject in self.observers:
            return True
        plan = self._make_plan(proposal, view, set(leaving))
        if plan is None:
            return False
        self.on_join_plan(plan)
        return True

    def _make_plan(self, proposal: Proposal, view: View, leaving: set[str]) -> JoinPlan | None:
        """Shards of snapshot `step` per source, from the planner and link figures.

        `step` follows the first step whose totals have not left this root: the plan goes
        out ahead of them, so every source learns of it before it publishes snapshot
        `step`, and the root streams that step's total and every later one. Its size is
        the current state's (the same from the first optimizer step on).
        """
        if self._progress.completed < 0:
            return None
        view_step = (view.epoch, self._progress.step)
        step = self._progress.step + (2 if self._totals_sent() == view_step else 1)
        candidates = [m for m in sorted(view.members) if m in self._replicators]
        figures = source_bandwidths(
            [m for m in candidates if m not in leaving],
            proposal.subject,
            self._telemetry.monitor.table,
            self._clock(),
            shaped=lambda m: shape_for(self._shapes, m, proposal.subject).rate_bytes_per_s,
            default=DEFAULT_BANDWIDTH,
        )
        sources = [
            Source(id=m, bandwidth_bytes_per_s=bw, latency_s=self._cfg.shard_overhead_s)
            for m, (bw, _) in figures.items()
        ]
        state_bytes = max(1, layout_of(self._spec.model, self._spec.optimizer)[0].total_bytes)
        plan = shard_plan(state_bytes, sources, self._cfg.join_strategy)
        assignment = plan.shard_indices()
        return JoinPlan(
            id=uuid.uuid4().hex,
            origin=self.me,
            joiner=proposal.subject,
            joiner_address=proposal.address,
            step=step,
            state_bytes=state_bytes,
            shards=plan.shards,
            assignment=assignment,
            replicators={m: self._replicators[m] for m in assignment},
            bandwidths={s.id: s.bandwidth_bytes_per_s for s in sources},
            figures={m: figure for m, (_, figure) in figures.items()},
            manifest_from=next(iter(assignment)),
            predicted_s=plan.makespan_s,
            strategy=self._cfg.join_strategy,
        )

    def expect_probe(self, proposal: Proposal) -> None:
        """A newcomer announced its downlink probe (a `probe` join proposal, sealed by
        itself): this member's replicator may answer it, unless it is a member of a view
        this member knows (`replication.admission`)."""
        if proposal.kind != "join" or proposal.mode != "probe" or proposal.subject == self.me:
            return
        pending = self._membership.pending
        views = (self._membership.view, pending.view if pending is not None else None)
        if any(view is not None and proposal.subject in view.members for view in views):
            return
        self._store.admissions.expect_probe(proposal.subject, proposal.id, self._clock())

    def on_join_plan(self, plan: JoinPlan) -> bool:
        """Learn of a join: pass the plan on, pin the snapshot it pulls, and stream to the
        observer. True for a new plan of this member's own join (the newcomer's part)."""
        if plan.id in self._seen:
            return False
        self._seen.add(plan.id)
        self._out.flood(plan)
        if plan.joiner == self.me:
            return True
        if self._membership.view is not None:
            self._telemetry.stall.change_started()
        if self.me in plan.assignment:
            # the manifest's hashes ahead of its request, at this process's priority (a
            # replicator process takes them from the snapshot directory)
            manifest = self.me == plan.manifest_from
            self._store.want(plan.step, plan.shards if manifest else None, plan.joiner)
        self.observers[plan.joiner] = plan
        self._out.connect(plan.joiner, plan.joiner_address)
        if plan.origin == self.me:
            self._out.report(
                "join_planned",
                joiner=plan.joiner,
                step=plan.step,
                shards=plan.shards,
                assignment={m: len(v) for m, v in plan.assignment.items()},
                bandwidths=plan.bandwidths,
                figures=plan.figures,
                predicted_s=plan.predicted_s,
                t=self._clock(),
            )
        return False

    def stream_to_observers(self, step: int, total: np.ndarray) -> None:
        """As root, send the total of `step` to every newcomer replaying from before it."""
        view = self._membership.view
        if view is None or view.root != self.me:
            return
        for joiner, plan in self.observers.items():
            if step >= plan.step:
                message = ObservedTotal(sender=self.me, step=step, dtype=total.dtype.str)
                self._out.send(joiner, message, total)

    def admit(
        self, decision: Decision, old: View | None, joiners: list[str], send_state: bool
    ) -> None:
        """The planned view of `decision` admits `joiners`: they observe no longer, and a
        `copy` joiner gets the state from one member (unless `send_state` is False), saved
        on the state thread and sent once saved (with TLS, a second member's digest too)."""
        for member in joiners:
            plan = self.observers.pop(member, None)
            if plan is not None:
                # a newcomer that asked early may still be pulling: keep the snapshot until
                # this step is reduced, which needs the newcomer's share, hence its state
                self._unpin_after[plan.step] = self._progress.step
        copying = {c.subject for c in decision.causes if c.kind == "join" and c.mode == "copy"}
        copying = [m for m in joiners if m in copying]
        if not (send_state and copying):
            return
        step, epoch = self._progress.step, decision.view.epoch
        if self.me == state_source(decision):
            saving = self._state_thread.run(self._save_state)
            self._spawn(self._send_state(saving, copying, step, epoch))
        elif self._cfg.tls and self.me == state_witness(decision):
            for joiner in copying:
                # the witness need not be the joiner's overlay neighbour: open the link (a
                # later trim of links to non-neighbours says goodbye after this frame)
                self._out.connect(joiner, decision.view.members[joiner])
            model, optimizer = self._spec.model, self._spec.optimizer
            digesting = self._state_thread.run(state_digest, model, optimizer)
            self._spawn(self._send_witness(digesting, copying, step, epoch))

    async def _send_state(
        self,
        saving: asyncio.Future[tuple[Layout, np.ndarray, str]],
        joiners: list[str],
        step: int,
        epoch: int,
    ) -> None:
        """Send the state saved on the state thread to the `copy` joiners, once saved."""
        layout, state, digest = await saving
        message = StateTransfer(
            sender=self.me, step=step, epoch=epoch, layout=layout.model_dump(), sha256=digest
        )
        for joiner in joiners:  # sealed (with TLS) by the outbox, as this member's word
            sent = self._out.send(joiner, message, state.data)
            self._telemetry.count_replication(joiner, "sent", state.nbytes)
            self._out.report("state_sent", joiner=joiner, step=step, queued=sent)

    async def _send_witness(
        self, digesting: asyncio.Future[str], joiners: list[str], step: int, epoch: int
    ) -> None:
        """Vouch for the state the `copy` joiners get: a second member's word, so one
        source cannot forge it."""
        witness = StateWitness(sender=self.me, step=step, epoch=epoch, state_sha256=await digesting)
        for joiner in joiners:
            sent = self._out.send(joiner, witness)
            self._out.report("witness_sent", joiner=joiner, step=step, queued=sent)

    def _spawn(self, work: Coroutine[None, None, None]) -> None:
        """Run `work` as a task held until it ends; a failure is logged (the joiner waits
        in vain, gives up and asks again)."""
        task = asyncio.get_running_loop().create_task(work)
        self._copies.add(task)
        task.add_done_callback(self._copy_done)

    def _copy_done(self, task: asyncio.Task) -> None:
        self._copies.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("state copy for a joiner failed: %r", task.exception())

    def release_pins(self, step: int) -> None:
        """Step `step` is applied: free the snapshots pinned until then."""
        for pinned in [s for s, after in self._unpin_after.items() if after <= step]:
            self._store.release(pinned)
            del self._unpin_after[pinned]

    def _save_state(self) -> tuple[Layout, np.ndarray, str]:
        """The flat state, its layout and the SHA-256 of its bytes (on the state thread;
        the copy and the hash leave the GIL to the event loop)."""
        layout, tensors = layout_of(self._spec.model, self._spec.optimizer)
        state = fresh_bytes(layout.total_bytes)
        copy_into(state, layout, tensors)
        return layout, state, hashlib.sha256(state.data).hexdigest()
