"""The newcomer's side of a join, and a paused member's rejoin.

An `observe` join times the downlink from every member's replicator (`join/probe.py`),
asks the root with those figures, pulls the planned snapshot from several members at once
(`Puller`, in a thread of its own), asks for its switch step while the last shards arrive
(`membership/readiness.py`), loads the state, and replays the totals the root streams
until the decision that admits it takes effect. Incumbents never wait for the transfer.
A `copy` join (or an observe join that fails before a switch step is agreed) waits for the
decision and takes the whole state from one member at its switch step. With TLS, no byte
of a state or a shard is used unless it matches a digest sealed by the member whose
snapshot it is (`join/state.py`, `replication/puller.py`); what fails is refused as
`forged`, and the join fetches it elsewhere or asks again.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import uuid
from collections import deque
from collections.abc import Callable
from typing import NoReturn

import numpy as np
import torch

from chaos_worker.collective import TreeAllReduce
from chaos_worker.config import Admission, WorkerConfig
from chaos_worker.join.probe import probe_downlinks
from chaos_worker.join.state import StateInbox
from chaos_worker.membership.liveness import Liveness
from chaos_worker.membership.protocol import Membership
from chaos_worker.membership.readiness import ask_now, ready_in, step_period, switch_decision
from chaos_worker.membership.rules import joining, state_witness
from chaos_worker.net.bounds import Reject
from chaos_worker.net.receiver import Payload
from chaos_worker.net.shaping import TokenBucket
from chaos_worker.net.signing import Verifier
from chaos_worker.net.transport import TcpTransport, TransportFactory
from chaos_worker.net.wire import (
    Decision,
    JoinPlan,
    ObservedTotal,
    Proposal,
    StateTransfer,
    StateWitness,
)
from chaos_worker.ports import Clock, Outbox, Progress, Signal
from chaos_worker.replication.puller import JoinFailed, Puller, PullResult
from chaos_worker.replication.snapshot import (
    Layout,
    SnapshotStore,
    checked_layout,
    copied_by_load,
    load_from,
    state_digest,
)
from chaos_worker.telemetry.telemetry import Telemetry
from chaos_worker.training.state_thread import StateThread
from chaos_worker.training.trainer import Trainer
from chaos_worker.training.trainspec import TrainSpec

log = logging.getLogger(__name__)

JOIN_PATIENCE = 30.0
"""Failure timeouts a join attempt waits for its next sign of progress (a plan, a
decision, a total, the state) before it gives up and tries again through another member."""

REJOIN_EVERY = 3.0
"""Failure timeouts between two requests of a paused member to be admitted again."""

PROBE_WAIT_BEATS = 10
"""Heartbeats per member a probing newcomer hears before it gives up on a replicator that
was never named (with no heartbeat at all, the join's patience bounds the wait)."""
SEED = "_seed"
"""The transport's name for the member a newcomer joins through."""


class Newcomer:
    """Brings this member into a running job, or back into it after a partition."""

    def __init__(
        self,
        me: str,
        config: WorkerConfig,
        spec: TrainSpec,
        device: torch.device,
        *,
        membership: Membership,
        liveness: Liveness,
        trainer: Trainer,
        collective: TreeAllReduce,
        store: SnapshotStore,
        state_thread: StateThread,
        telemetry: Telemetry,
        outbox: Outbox,
        progress: Progress,
        clock: Clock,
        reject: Reject,
        transport_factory: TransportFactory = TcpTransport,
        verifier: Verifier | None = None,
        admission: Callable[[], Admission] | None = None,
    ) -> None:
        """`collective` checks the totals streamed here; `reject` counts those refused;
        `verifier` (with TLS) checks the seals on states and manifests; `admission` gives
        this worker's admission (`membership.joiners`) for its join proposals;
        `state_thread` loads a `copy` join's state, after the copies of the old one."""
        self._admission = admission
        self.me = me
        self._transport_factory = transport_factory
        self.address = config.listen
        """Where peers reach this member (set once it listens)."""
        self._cfg = config
        self._spec = spec
        self._device = device
        self._membership = membership
        self._liveness = liveness
        self._trainer = trainer
        self._collective = collective
        self._reject = reject
        self._store = store
        self._state_thread = state_thread
        self._telemetry = telemetry
        self._out = outbox
        self._progress = progress
        self._clock = clock
        self._seeds = [config.join] if config.join else []
        self._ordered = asyncio.Event()  # a standby's order to join
        self._news = Signal()  # a plan, a decision or a total arrived
        self._plan: JoinPlan | None = None
        self._decision: Decision | None = None  # the decision this newcomer switches in at
        self._observed: dict[int, np.ndarray] = {}
        self._observed_at: deque[float] = deque(maxlen=8)  # arrivals: the step period
        self._gap: int | None = None
        """The first step whose total was refused for the backlog: replay cannot pass it."""
        self._asked_ready = False
        self._states = StateInbox(verifier, reject, config.state_quorum)  # copies offered
        self.place_state = self._states.place
        self._rejoining: asyncio.Task | None = None
        self._checking: set[asyncio.Task] = set()  # states arrived, being hashed

    # ------------------------------------------------------------------ joining

    def order(self, seed: str, others: list[str] | None = None) -> None:
        """A standby's order to join through the member at `seed` (or, should that fail,
        through `others`)."""
        self._seeds = [seed, *(others or [])]
        self._ordered.set()

    async def join(self, *, standby: bool) -> None:
        """Ask a member to admit us, then catch up as an observer or by a full copy. An
        attempt that fails (a seed or source that dies, no answer within the patience)
        is given up cleanly and tried again by a full copy through another member."""
        if standby:
            self._out.report("standby", t=self._clock())
            await self._ordered.wait()
        requested = self._clock()
        self._telemetry.scale_out_started(requested)
        self._out.report("join_requested", t=requested, mode=self._cfg.join_mode)
        mode = self._cfg.join_mode
        for attempt in itertools.count():
            seed = self._next_seed(attempt)
            self._out.connect(SEED, seed)
            try:
                await self._attempt(mode)
                return
            except JoinFailed as exc:
                self._out.report(
                    "join_retry", reason=str(exc), attempt=attempt + 1, t=self._clock()
                )
                self._give_up()
                mode = "copy"
                await asyncio.sleep(self._cfg.failure_timeout_s)  # let a recovery drop us

    async def _attempt(self, mode: str) -> None:
        patience = JOIN_PATIENCE * self._cfg.failure_timeout_s
        if mode == "observe":
            await self._measure_downlinks()
            self._ask("observe")
            try:
                await self._join_as_observer(patience)
                return
            except JoinFailed as exc:
                if self._asked_ready:  # a switch step is agreed: the members expect us there
                    raise
                self._out.report("join_fallback", reason=str(exc), t=self._clock())
        self._ask("copy")
        await self._until(lambda: self._decision is not None, patience, "member admitted us")
        decision = self._decision
        await self._take_state(decision, patience)
        self._out.disconnect(SEED)
        self._membership.install(decision, self._clock(), send_state=False)
        self._out.report("joined", path="stop-and-copy", t=self._clock())

    async def _until(self, done: Callable[[], bool], patience: float | None, what: str) -> None:
        """Wait for news until `done()`; JoinFailed ("no `what` within ...") after
        `patience` seconds (None: wait for ever)."""
        deadline = None if patience is None else self._clock() + patience
        while not done():
            if deadline is None:
                await self._news.wait()
                continue
            if self._clock() >= deadline:
                raise JoinFailed(f"no {what} within {patience:g} s")
            await self._news.wait(deadline - self._clock())

    def _next_seed(self, attempt: int) -> str:
        """The member to ask through: the seeds given, then every member address heard."""
        known = [a for m, a in self._membership.addresses.items() if m != self.me]
        seeds = list(dict.fromkeys([*self._seeds, *known]))
        return seeds[attempt % len(seeds)]

    def _give_up(self) -> None:
        """Forget a failed attempt. If a decision already admits us, the members expect us
        at its step: tell them we are gone (a confirmed crash of ours) so that nobody
        waits for us, and forget the observed totals, the plan and the state."""
        decision = self._decision
        if decision is not None and self.me in decision.view.members:
            self._membership.withdraw(decision, self._clock())
        self._out.disconnect(SEED)
        self._plan = None
        self._decision = None
        self._observed.clear()
        self._gap = None
        self._asked_ready = False
        self._states.clear()

    def _ask(self, mode: str, ready_in_s: float = 0.0) -> None:
        now = self._clock()
        links = self._telemetry.fresh_links(now)
        proposal = Proposal(
            id=uuid.uuid4().hex,
            origin=self.me,
            kind="join",
            subject=self.me,
            address=self.address,
            detected_at=now,
            epoch=-1,
            mode=mode,
            links={kind: entries for kind, entries in links.items() if entries},
            ready_in_s=ready_in_s,
            admission=self._admission() if self._admission else None,
        )
        self._membership.announce(proposal)

    async def _measure_downlinks(self) -> None:
        """Time the downlink from every member's replicator, one at a time (`probe.py`).

        A `probe` proposal makes the members connect here, so their heartbeats (which name
        their replicators and the size of their view) arrive; once every member's has (or
        once `PROBE_WAIT_BEATS` heartbeats per member were heard and some member still named
        none: counted in heartbeats, not seconds, so a loaded machine that slows every
        member alike does not cut the wait short), each replicator is probed and the
        figures go into the link table, to be sent with the join proposal.
        """
        if self._cfg.join_probe_frames == 0:
            return
        self._ask("probe")
        liveness = self._liveness
        start = liveness.beats_heard
        deadline = self._clock() + JOIN_PATIENCE * self._cfg.failure_timeout_s
        while not liveness.knows_every_replicator():
            heard = liveness.beats_heard - start
            left = deadline - self._clock()
            if heard >= PROBE_WAIT_BEATS * max(1, liveness.job_size) or left <= 0:
                break
            await liveness.beats.wait(left)
        replicators = self._liveness.replicators
        others = {m: a for m, a in replicators.items() if m != self.me}
        downlink = self._cfg.downlink_bytes_per_s
        measured = await probe_downlinks(
            self.me,
            others,
            host=self.address.rpartition(":")[0],
            downlink=TokenBucket(downlink) if downlink else None,
            frames=self._cfg.join_probe_frames,
            transport_factory=self._transport_factory,
        )
        now = self._clock()
        for source, m in measured.items():
            self._telemetry.monitor.table.observe_transfer(
                source, self.me, m.nbytes, m.seconds, now
            )
        self._out.report(
            "downlinks_measured",
            bytes_per_s={s: round(m.bytes_per_s) for s, m in measured.items()},
            complete={s: m.complete for s, m in measured.items()},
            t=now,
        )

    async def _join_as_observer(self, patience: float) -> None:
        """Pull the planned snapshot from several members, replay the observed totals, and
        ask to contribute once current; incumbents never wait for the transfer."""
        await self._until(lambda: self._plan is not None, patience, "shard plan")
        plan = self._plan
        started = self._clock()
        last = [0.0]

        def progress(received: dict[str, int], done: int, shards: int) -> None:
            now = self._clock()
            if now - last[0] >= 0.2 or done == shards:
                last[0] = now
                self._out.report("join_progress", bytes=received, done=done, shards=shards, t=now)

        loop = asyncio.get_running_loop()
        downlink, tls = self._cfg.downlink_bytes_per_s, self._cfg.tls
        pullers: list[Puller] = []
        pulled: asyncio.Future[PullResult] = loop.create_future()

        def take(result: PullResult) -> None:
            if not pulled.done():
                pulled.set_result(result)

        def pull() -> PullResult:  # in a thread of its own, so this loop stays responsive
            async def run() -> PullResult:
                puller = Puller(
                    self.me,
                    plan,
                    host=self.address.rpartition(":")[0],
                    downlink=TokenBucket(downlink) if downlink else None,
                    stall_timeout_s=self._cfg.stall_timeout_s,
                    on_progress=lambda *a: loop.call_soon_threadsafe(progress, *a),
                    # the result goes to this loop at once; closing the links comes after
                    on_result=lambda r: loop.call_soon_threadsafe(take, r),
                    transport_factory=self._transport_factory,
                    # a verifier of its own thread; refusals are counted on this loop
                    verifier=Verifier(tls.ca) if tls else None,
                    reject=lambda *a: loop.call_soon_threadsafe(self._reject, *a),
                    quorum=self._cfg.state_quorum,
                )
                pullers.append(puller)
                return await puller.run()

            return asyncio.run(run())

        pulling = asyncio.ensure_future(asyncio.to_thread(pull))
        pulling.add_done_callback(
            lambda f: None if f.cancelled() or pulled.done() else _settle_from(pulled, f)
        )
        model, optimizer = self._spec.model, self._spec.optimizer
        load_bytes = copied_by_load(model, plan.state_bytes, self._device)
        while not pulled.done():  # ask for the switch step while the last shards arrive
            await asyncio.wait({pulled}, timeout=0.005)
            remaining = pullers[0].remaining_s(self._clock()) if pullers else float("inf")
            period = step_period(self._observed_at)
            # never a switch step once the stream has a gap: the members would wait for us
            if (
                not self._asked_ready
                and self._gap is None
                and ask_now(remaining, load_bytes, period)
            ):
                self._ask_ready(remaining, load_bytes)
        result = pulled.result()
        self._telemetry.observe_pull(result.bytes_per_source, result.transfers)
        self._check_gap()
        if not self._asked_ready:
            self._ask_ready(0.0, load_bytes)
        # in a thread: this loop sends the `ready` proposal and takes observed totals meanwhile
        await self._state_thread.run(
            load_from, result.data, result.layout, model, optimizer, self._device
        )
        self._progress.step = plan.step
        self._progress.completed = plan.step - 1
        self._out.report(
            "state_loaded",
            step=plan.step,
            bytes_per_source=result.bytes_per_source,
            replans=result.replans,
            rejected=result.rejected,
            pull_s=self._clock() - started,
            rebalances=result.rebalances,
            strategy=plan.strategy,
            bandwidths=plan.bandwidths,
            figures=plan.figures,
            t=self._clock(),
        )
        await self._catch_up(patience)

    def _check_gap(self) -> None:
        """JoinFailed once a total this member needs was refused for the backlog (one
        before the switch step, or before any is agreed): the stream cannot be replayed
        past it, and waiting would make the members wait at the switch for a member that
        cannot come (until the join's patience ran out)."""
        gap, decision = self._gap, self._decision
        if gap is not None and (decision is None or decision.effective_step > gap):
            raise JoinFailed(
                f"the gradient stream ran {self._cfg.observer_max_backlog} steps ahead of "
                f"replay (the total of step {self._gap} was refused)"
            )

    def _ask_ready(self, remaining_s: float, load_bytes: int) -> None:
        self._asked_ready = True
        wait = ready_in(remaining_s, load_bytes)
        self._out.report(
            "ready_asked",
            remaining_s=round(remaining_s, 4),
            ready_in_s=round(wait, 4),
            t=self._clock(),
        )
        self._ask("ready", ready_in_s=wait)

    async def _catch_up(self, patience: float) -> None:
        """Replay observed totals until the decision that admits this member takes effect
        (JoinFailed when the totals stop coming for `patience` seconds)."""
        progress = self._progress
        reported = False
        heard = self._clock()
        while True:
            while progress.step in self._observed:
                await self._trainer.apply(self._observed.pop(progress.step), observed=True)
            for step in [s for s in self._observed if s < progress.step]:
                del self._observed[step]
            self._check_gap()
            decision = self._decision
            if decision is not None and decision.effective_step <= progress.step:
                self._out.disconnect(SEED)
                self._membership.install(decision, self._clock(), send_state=False)
                self._out.report("joined", path="observer", t=self._clock())
                return
            if len(self._observed) > self._cfg.observer_max_backlog:
                raise JoinFailed(
                    f"the gradient stream ran {len(self._observed)} steps ahead of replay"
                )
            if not reported:
                reported = True
                self._out.report("caught_up", step=progress.step, t=self._clock())
            if self._clock() - heard > patience:
                raise JoinFailed(f"no total or decision arrived for {patience:g} s")
            await self._news.wait(patience)
            if self._observed or self._decision is not None:
                heard = self._clock()

    async def _take_state(self, decision: Decision, patience: float | None = None) -> None:
        """Wait for the full-state copy `decision` admits this member with (JoinFailed
        after `patience` seconds) and load it."""
        unvouched = self._states.unvouched(decision)
        if unvouched is not None:
            raise JoinFailed(unvouched)
        taken: list[tuple[StateTransfer, Payload | np.ndarray]] = []

        def arrived() -> bool:
            state = self._states.take(decision)
            taken.extend([state] if state is not None else [])
            return bool(taken)

        await self._until(arrived, patience, "state of the decision that admits us")
        message, blob = taken[0]
        step = message.step
        self._telemetry.count_replication(message.sender, "received", len(blob))
        try:
            layout = checked_layout(message.layout, len(blob))
        except ValueError as exc:
            self._refuse(message, f"its layout: {exc}")
        try:  # on the state thread: this loop goes on beating and taking messages meanwhile
            digest = await self._state_thread.run(self._load_state, layout, blob)
        except (RuntimeError, ValueError, KeyError) as exc:  # a layout this model refuses
            self._refuse(message, f"it does not load: {exc}")
        vouched = self._states.vouched(decision, message)
        if vouched is not None and digest != vouched:
            self._refuse(message, f"it is not the one {state_witness(decision)} vouched for")
        self._progress.step = step
        self._progress.completed = step - 1

    def _load_state(self, layout: Layout, blob: Payload | np.ndarray) -> str:
        """Load a `copy` join's flat state and return its `state_digest`."""
        load_from(blob, layout, self._spec.model, self._spec.optimizer, self._device)
        return state_digest(self._spec.model, self._spec.optimizer)

    def _refuse(self, message: StateTransfer, why: str) -> NoReturn:
        """Count the state `message` brought as forged and fail this attempt to join."""
        detail = f"state of step {message.step} from {message.sender}: {why}"
        self._reject(message.sender, "forged", detail)
        raise JoinFailed(f"the {detail}")

    # ------------------------------------------------------------------ messages

    def on_plan(self, plan: JoinPlan) -> None:
        """The root's shard plan for this member's join (the first one counts)."""
        if self._plan is None:
            self._plan = plan
            self._news.notify()

    def on_decision(self, decision: Decision) -> None:
        """A decision taken in while this member holds no view yet."""
        self._decision = switch_decision(self._decision, decision, self.me)
        self._news.notify()

    def on_total(self, sender: str, message: ObservedTotal, payload: bytes, now: float) -> None:
        """A total the root streams to this observer, to replay: checked as a bucket is,
        and held for at most one step past the backlog that makes the join fail."""
        if self._membership.view is not None or message.step < self._progress.step:
            return
        fault = self._collective.check_total(message.dtype, payload)
        if fault is None and len(self._observed) > self._cfg.observer_max_backlog:
            fault = "unexpected", f"{len(self._observed)} totals held already"
            if self._gap is None:
                self._gap = message.step
                self._news.notify()
        if fault is not None:
            self._reject(sender, fault[0], f"total of step {message.step}: {fault[1]}")
            return
        self._observed_at.append(now)
        self._observed[message.step] = np.frombuffer(payload, dtype=message.dtype).copy()
        self._news.notify()

    def on_witness(self, sender: str, message: StateWitness) -> None:
        """A second member's sealed digest of the state a `copy` join takes."""
        if self._states.witness(sender, message):
            self._news.notify()

    def on_state(self, sender: str, message: StateTransfer, payload: bytes) -> None:
        """The full state of a `copy` join (or a rejoin), held once checked."""
        task = asyncio.get_running_loop().create_task(self._check_state(sender, message, payload))
        self._checking.add(task)
        task.add_done_callback(self._checking.discard)

    async def _check_state(self, sender: str, message: StateTransfer, payload: bytes) -> None:
        """Hash the state off the event loop (half a second at 600 MB), then offer it."""
        state = self._states.writable(sender, message, payload)
        digest = await asyncio.to_thread(lambda: hashlib.sha256(payload).hexdigest())
        decision = self._decision if self._membership.view is None else self._membership.pending
        if decision is not None and self.me not in joining(decision):
            decision = None  # not the one admitting this member: judged when that one is
        if self._states.offer(sender, message, state, digest, decision):
            self._news.notify()

    # ------------------------------------------------------------------ rejoining

    def rejoin(self) -> None:
        """A paused or removed member asks the others to admit it again; it asks again
        every `REJOIN_EVERY` failure timeouts until a decision admits it."""
        self._ask_back()
        if self._rejoining is None:
            self._rejoining = asyncio.get_running_loop().create_task(self._rejoin_wait())

    def _ask_back(self) -> None:
        """Open links to every member address known and flood a join proposal on them."""
        membership = self._membership
        view = membership.view
        for member, address in membership.addresses.items():
            if member != self.me:
                self._out.connect(member, address)
        proposal = Proposal(
            id=f"join:{self.me}:{uuid.uuid4().hex[:8]}",
            origin=self.me,
            kind="join",
            subject=self.me,
            address=self.address,
            detected_at=self._clock(),
            epoch=view.epoch if view is not None else -1,
            admission=self._admission() if self._admission else None,
        )
        membership.announce(proposal)
        self._out.report("join_requested", t=proposal.detected_at, rejoin=True)

    async def _rejoin_wait(self) -> None:
        """Take the state and install the planned view once one admits this member."""
        membership = self._membership
        every = REJOIN_EVERY * self._cfg.failure_timeout_s
        asked = self._clock()
        refused: set[str] = set()  # decisions whose state failed its witness's word

        def admitting() -> Decision | None:
            decision = membership.pending  # one agreed before the pause holds us, not joins
            if decision is None or self.me not in joining(decision):
                return None
            return None if decision.id in refused else decision

        while True:
            while (decision := admitting()) is None:
                await membership.changed(timeout=max(0.0, asked + every - self._clock()))
                if self._clock() >= asked + every and admitting() is None:
                    self._ask_back()
                    asked = self._clock()
            try:
                await self._take_state(decision, JOIN_PATIENCE * self._cfg.failure_timeout_s)
            except JoinFailed as exc:  # a forged state, or none in time: leave it, ask again
                refused.add(decision.id)
                membership.withdraw(decision, self._clock())
                self._states.clear()
                self._out.report("join_retry", reason=str(exc), rejoin=True, t=self._clock())
                continue
            membership.install(decision, self._clock(), send_state=False)
            self._rejoining = None
            return


def _settle_from(target: asyncio.Future, source: asyncio.Future) -> None:
    """Give `target` the outcome of `source` (done)."""
    if source.exception() is not None:
        target.set_exception(source.exception())
    else:
        target.set_result(source.result())
