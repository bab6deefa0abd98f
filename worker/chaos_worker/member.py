"""One member of an elastic job: the training loop and the membership protocol.

Protocol (every change takes effect at a step boundary):

* Liveness: every member floods a heartbeat each `heartbeat_interval_s`; a member not
  heard from (over any path) for `failure_timeout_s`, or whose connection closes without a
  goodbye, is suspected crashed. Links are reported down by their ends
  (in local runs, on the launcher's command).
* Planned changes (leave, join, link up, link down off the tree) are proposals flooded to
  everybody; the epoch's root decides them into the next view with an effective step `T`
  from the switch-step rule and floods the decision. Decisions and the down-pass of every
  all-reduce travel the same FIFO links from the root, so each member holds the decision
  before it can finish step `T - 1`.
* Immediate changes (crash, link down on the tree) abort the all-reduce in flight. Every
  member floods its last completed step; the recovery coordinator (the smallest id not
  suspected on its side) decides the next view. If some member already holds the total of
  the aborted step, a member that holds it becomes root and sends it down the new tree;
  otherwise the step is redone with the same sample ids. No step is lost.
* Partition: only the side with the majority of the previous epoch's throughput goes on;
  the other side pauses, says so, and rejoins as newcomers when a link heals.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from chaos_worker.collective import TreeAllReduce
from chaos_worker.config import WorkerConfig
from chaos_worker.join.newcomer import Newcomer
from chaos_worker.join.sponsor import JoinSponsor
from chaos_worker.membership.liveness import Liveness
from chaos_worker.membership.readiness import (
    switch_steps,
)
from chaos_worker.membership.view import Change, View, full_mesh, initial_view, link_key, next_view
from chaos_worker.net.control import ControlLink
from chaos_worker.net.shaping import TokenBucket, delays_only, parse_links, shape_for
from chaos_worker.net.transport import TcpTransport
from chaos_worker.net.wire import (
    Chunk,
    Decision,
    Heartbeat,
    JoinPlan,
    LinkGossip,
    MemberStatus,
    Message,
    ObservedTotal,
    Ping,
    Pong,
    Proposal,
    StateTransfer,
    WireMessage,
)
from chaos_worker.ports import Progress
from chaos_worker.replication.ledger import SentReader
from chaos_worker.replication.replicator import Replicator
from chaos_worker.replication.sidecar import Child, start_child
from chaos_worker.replication.snapshot import (
    SnapshotStore,
    state_digest,
)
from chaos_worker.telemetry.metrics import WorkerMetrics
from chaos_worker.telemetry.telemetry import Telemetry
from chaos_worker.training.trainer import Trainer
from chaos_worker.training.trainspec import TrainSpec

log = logging.getLogger(__name__)

# Decisions are flooded on the same FIFO links as the all-reduce, and forwarded on receipt.
# One the root sends before the down-pass of step s reaches every member before the totals
# of s, so it can take effect at s + 1; after that down-pass has begun, at s + 2, which is
# always in time. (The planner's `switch_step`, which budgets round trips from step time
# and RTT, is for decisions that travel outside the data path.)
FIFO_SWITCH_MARGIN = 2


@dataclass
class _Recovery:
    """What this member knows about the recovery round of its current epoch."""

    statuses: dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    decided: bool = False


class Member:
    """A worker process's membership state machine and training loop."""

    def __init__(self, config: WorkerConfig, spec: TrainSpec, device: torch.device) -> None:
        self.cfg = config
        self.me = config.id
        self.spec = spec
        self.device = device
        shapes = parse_links(config.links)
        wire = delays_only(shapes) if config.kernel_shaped else shapes  # tc shapes the rates
        downlink = config.downlink_bytes_per_s
        self.transport = TcpTransport(
            self.me,
            self._on_message,
            self._on_disconnect,
            max_payload=1 << 34,
            shape=lambda peer: shape_for(wire, self.me, peer),
            downlink=TokenBucket(downlink) if downlink else None,
        )
        self.control = ControlLink(config.control, self._on_command)
        self.outbox = LinkOutbox(self.me, self.transport, self.control)
        self.progress = Progress()
        metrics = WorkerMetrics(self.me) if config.metrics_port is not None else None
        self.telemetry = Telemetry(
            self.me, outbox=self.outbox, clock=time.monotonic, metrics=metrics
        )
        self.liveness = Liveness(
            self.me,
            heartbeat_interval_s=config.heartbeat_interval_s,
            failure_timeout_s=config.failure_timeout_s,
            membership=self,  # until the protocol has a class of its own
            telemetry=self.telemetry,
            outbox=self.outbox,
            progress=self.progress,
            clock=time.monotonic,
        )
        self._inline = config.replicator == "inline" and not config.replicator_address
        self._owned_dir: Path | None = None  # a private snapshot directory, removed at exit
        directory = Path(config.snapshot_dir) if config.snapshot_dir else None
        if directory is None and not self._inline:
            shm = Path("/dev/shm")
            where = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
            self._owned_dir = Path(tempfile.mkdtemp(prefix=f"chaos-{self.me}-", dir=where))
            directory = self._owned_dir
        self.store = SnapshotStore(directory)
        self.sponsor = JoinSponsor(
            self.me,
            config,
            spec,
            membership=self,  # until the protocol has a class of its own
            replicators=self.liveness.replicators,
            shapes=shapes,
            store=self.store,
            telemetry=self.telemetry,
            outbox=self.outbox,
            progress=self.progress,
            clock=time.monotonic,
        )
        self.replicator = (
            Replicator(
                self.me,
                self.store,
                shape=lambda peer: shape_for(wire, self.me, peer),
                on_sent=lambda peer, n: self.telemetry.count_replication(peer, "sent", n),
            )
            if self._inline
            else None
        )
        self._child: Child | None = None
        self.view_step = -1
        """The step the view in force took effect at (`View.shares`)."""
        self._received_at: dict[str, float] = {}  # proposal id -> when it arrived here
        self.collective = TreeAllReduce(
            self.me, self.transport.send, bucket_bytes=config.bucket_bytes
        )
        self.view: View | None = None
        self.address = config.listen
        self._seen: set[str] = set()
        self._speeds: dict[str, float] = {}
        self._open: dict[str, Proposal] = {}
        self.pending: Decision | None = None
        self.suspects: set[str] = set()
        self._recovery: _Recovery | None = None
        self._decided: asyncio.Event = asyncio.Event()
        self._immediate: Decision | None = None
        self._floor_epoch = 0
        self.aborting = False
        self._leaving = False
        self._tasks: list[asyncio.Task] = []
        self.trainer = Trainer(
            self.me,
            config,
            spec,
            device,
            membership=self,  # until the protocol has a class of its own
            collective=self.collective,
            store=self.store,
            telemetry=self.telemetry,
            outbox=self.outbox,
            progress=self.progress,
            clock=time.monotonic,
            on_reduced=self.sponsor.stream_to_observers,
            on_stepped=self.sponsor.release_pins,
        )
        self.newcomer = Newcomer(
            self.me,
            config,
            spec,
            device,
            membership=self,  # until the protocol has a class of its own
            liveness=self.liveness,
            trainer=self.trainer,
            store=self.store,
            telemetry=self.telemetry,
            outbox=self.outbox,
            progress=self.progress,
            clock=time.monotonic,
        )

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Join or start the job, train until the last step, then leave cleanly."""
        host = self.cfg.listen.rpartition(":")[0]
        # the replicator first: starting a process takes a while, and once this member
        # listens, the others' messages (a probe) need answers on links not yet opened
        self.liveness.replicators[self.me] = await self._start_replicator(host)
        port = await self.transport.listen(host, int(self.cfg.listen.rpartition(":")[2]))
        self.address = f"{host}:{port}"
        self.newcomer.address = self.address
        await self.control.open()
        metrics = self.telemetry.metrics
        metrics_port = metrics.serve(host, self.cfg.metrics_port) if metrics else None
        self.outbox.report("ready", address=self.address, metrics_port=metrics_port)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self.liveness.heartbeats()),
            loop.create_task(self.liveness.watch()),
        ]
        if self.cfg.control is None:  # in a pod: deletion (SIGTERM) is a graceful leave
            loop.add_signal_handler(signal.SIGTERM, self._on_sigterm)
        if self.cfg.members:
            members = {**self.cfg.members, self.me: self.address}
            self.view = initial_view(members, self.cfg.overlay or full_mesh(members))
            self._sync_links()
        else:
            await self.newcomer.join(standby=self.cfg.standby)
        try:
            await self.trainer.run()
        finally:
            for task in self._tasks:
                task.cancel()
            self.trainer.close()
            digest = state_digest(self.spec.model, self.spec.optimizer)
            self.outbox.report(
                "exit",
                step=self.progress.step,
                completed=self.progress.completed,
                state_sha256=digest,
                links=self.telemetry.monitor.table.as_dict(time.monotonic()),
            )
            await self._stop_replicator()
            await self.transport.close()
            await self.control.close()

    async def _start_replicator(self, host: str) -> str:
        """Serve snapshots (see `WorkerConfig.replicator`); returns the address to advertise."""
        if self.replicator is not None:
            return await self.replicator.start(host)
        assert self.store.directory is not None
        self.telemetry.served = SentReader(self.store.directory).news
        if self.cfg.replicator_address:
            return self.cfg.replicator_address
        self._child = await start_child(
            self.me,
            self.store.directory,
            host,
            links=self.cfg.links,
            kernel_shaped=self.cfg.kernel_shaped,
        )
        return self._child.address

    async def _stop_replicator(self) -> None:
        if self.replicator is not None:
            await self.replicator.close()
        if self._child is not None:
            await self._child.stop()
        if self._owned_dir is not None:
            shutil.rmtree(self._owned_dir, ignore_errors=True)

    # ------------------------------------------------------------------ training

    async def at_boundary(self) -> bool:
        """Install what takes effect at this step; True when this member must stop."""
        while True:
            if self.aborting:
                return False
            pending = self.pending
            if (
                pending is not None
                and not self.view.paused
                and pending.effective_step <= self.progress.step
            ):
                self.install(pending)
            if self._leaving_now():
                return True
            if not self.view.paused:
                self._maybe_decide()
                return False
            await self._wait_change()

    def _leaving_now(self) -> bool:
        return self.me not in self.view.members

    async def _wait_change(self, timeout: float = 0.05) -> None:
        self._decided.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._decided.wait(), timeout)

    # ------------------------------------------------------------------ decisions

    def install(self, decision: Decision, *, send_state: bool = True) -> None:
        """Adopt the view of a planned decision at its effective step."""
        old = self.view
        self.view = View.model_validate(decision.view)
        self.view_step = decision.effective_step
        self.pending = None
        for cause in decision.causes:
            self._open.pop(cause["id"], None)
            self._received_at.pop(cause["id"], None)
        joiners = [m for m in self.view.members if old is None or m not in old.members]
        self.liveness.admit(joiners)
        self.sponsor.admit(decision, old, joiners, send_state)
        self._sync_links()
        self.telemetry.stall.change_installed()
        self._report_installed(decision)

    def _report_installed(self, decision: Decision) -> None:
        """Tell the launcher that the view of `decision` is now in force here."""
        self.telemetry.observe_decision(decision)
        self.outbox.report(
            "installed",
            decision=decision.id,
            epoch=self.view.epoch,
            step=self.progress.step,
            members=len(self.view.members),
            paused=self.view.paused,
            t=time.monotonic(),
        )

    def _maybe_decide(self) -> None:
        """As root, plan joins and turn open planned proposals into the next view."""
        if self.view.root != self.me or self.aborting:
            return
        self._plan_joins()
        if self.pending is not None:
            return
        proposals = [p for p in self._open.values() if self._relevant(p)]
        if not proposals:
            return
        changes = [_change(p) for p in proposals]
        leaving = {c.subject for c in changes if c.kind == "leave"}
        staying = [m for m in sorted(self.view.members) if m not in leaving] or [self.me]
        side_of = self.me if self.me in staying else staying[0]
        outcome = next_view(self.view, changes, side_of=side_of, speeds=self._speed_table())
        effective = self.progress.step + self._switch_margin(self._ready_wait(proposals))
        decision = Decision(
            id=uuid.uuid4().hex,
            origin=self.me,
            view=outcome.view.model_dump(),
            effective_step=effective,
            immediate=False,
            causes=[_cause(p) for p in proposals],
        )
        self._accept_decision(decision)

    def _switch_margin(self, wait_s: float) -> int:
        """Steps ahead a decision taken now takes effect: at least one while this step's
        totals have not left the root (the decision travels ahead of them), else
        `FIFO_SWITCH_MARGIN`; and not before `wait_s` from now (readiness.py)."""
        ahead = self.collective.down_sent != (self.view.epoch, self.progress.step)
        minimum = 1 if ahead else FIFO_SWITCH_MARGIN
        now = time.monotonic()
        return switch_steps(now, self.progress.started, self.progress.period(), wait_s, minimum)

    def _ready_wait(self, proposals: list[Proposal]) -> float:
        """Seconds from now until the slowest newcomer asking to switch in is ready."""
        now = time.monotonic()
        waits = [
            p.ready_in_s - (now - self._received_at.get(p.id, now))
            for p in proposals
            if p.kind == "join" and p.mode == "ready"
        ]
        return max([0.0, *waits])

    def _plan_joins(self) -> None:
        """As root, give every newcomer that asked to observe a shard plan (once)."""
        leaving = {p.subject for p in self._open.values() if p.kind == "leave"}
        for key, proposal in list(self._open.items()):
            if proposal.kind != "join" or proposal.mode != "observe":
                continue
            admitted = proposal.subject in self.view.members
            if not admitted and not self.sponsor.plan_join(proposal, self.view, leaving):
                return  # no snapshot to plan from yet
            del self._open[key]

    def _relevant(self, proposal: Proposal) -> bool:
        """Planned proposals that still change something in the current view."""
        if proposal.kind == "join":
            return proposal.subject not in self.view.members and proposal.mode != "observe"
        if proposal.kind == "leave":
            return proposal.subject in self.view.members
        is_down = link_key(proposal.subject, proposal.peer) in self.view.down
        if proposal.kind == "link_up":
            return is_down
        if proposal.kind == "link_down":
            ends = proposal.subject in self.view.members and proposal.peer in self.view.members
            return ends and not is_down
        return False

    def _speed_table(self) -> dict[str, float]:
        speeds = dict(self.view.speeds)
        speeds.update({m: s for m, s in self._speeds.items() if s > 0})
        if self.progress.samples_per_s > 0:
            speeds[self.me] = self.progress.samples_per_s
        return speeds

    def _accept_decision(self, decision: Decision) -> None:
        """Take a decision in (once), forward it, and schedule or start it."""
        if decision.id in self._seen:
            return
        self._seen.add(decision.id)
        view = View.model_validate(decision.view)
        stale = self.view is not None and view.epoch <= self.view.epoch and not self.view.paused
        if stale and not decision.immediate:
            return
        for member, address in view.members.items():
            if member != self.me and member in view.neighbours(self.me):
                self.transport.connect(member, address)
        self.outbox.flood(decision)
        self.outbox.report(
            "agreed",
            decision=decision.id,
            epoch=view.epoch,
            effective_step=decision.effective_step,
            members=sorted(view.members),
            t=time.monotonic(),
        )
        if self.view is None:
            self.newcomer.on_decision(decision)
        else:
            self.telemetry.stall.change_started()
        if decision.immediate:
            if self.view is None or view.epoch > self.view.epoch:
                self._immediate = decision
        else:
            self.pending = decision
        self._decided.set()

    # ------------------------------------------------------------------ recovery

    def suspect(self, member: str, detected_at: float) -> None:
        """A member looks dead: tell everybody and abort the step in flight."""
        if self.view is None or member not in self.view.members or member in self.suspects:
            return
        proposal = Proposal(
            id=f"crash:{member}:{self.view.epoch}",
            origin=self.me,
            kind="crash",
            subject=member,
            detected_at=detected_at,
            epoch=self.view.epoch,
        )
        self.outbox.report("detected", event="crash", subject=member, t=detected_at)
        self._on_proposal(proposal)

    def _begin_abort(self) -> None:
        self.telemetry.stall.change_started()
        if not self.aborting:
            self.aborting = True
            self._recovery = _Recovery()
        self.trainer.cancel_step()
        self._decided.set()

    async def recover(self) -> Decision:
        """Report progress to the coordinator, wait for the recovery decision and install
        its view; the trainer then replays the aborted step (`Trainer.replay`)."""
        epoch = self.view.epoch
        status = MemberStatus(
            id=f"status:{self.me}:{epoch}:{len(self.suspects)}",
            origin=self.me,
            epoch=epoch,
            round=len(self.suspects),
            completed=self.progress.completed,
        )
        self._on_status(status)
        while self._immediate is None or View.model_validate(self._immediate.view).epoch <= epoch:
            self.try_decide_recovery(time.monotonic())
            await self._wait_change()
        decision = self._immediate
        self._immediate = None
        view = View.model_validate(decision.view)
        for cause in decision.causes:
            self._open.pop(cause["id"], None)
        self.suspects.clear()
        self.pending = None
        self._recovery = None
        self.aborting = False
        self._floor_epoch = view.epoch
        self.view = view
        self.view_step = decision.effective_step
        self._sync_links()
        self.telemetry.stall.change_installed()
        return decision

    def recovered(self, decision: Decision) -> None:
        """The recovery of `decision` is complete here (replayed, at its step)."""
        self._report_installed(decision)
        if self.view.paused:
            self.outbox.report(
                "paused",
                reason="partition minority",
                members=sorted(self.view.members),
                t=time.monotonic(),
            )

    def _on_status(self, status: MemberStatus) -> None:
        if status.id in self._seen:
            return
        self._seen.add(status.id)
        self.outbox.flood(status)
        if self.view is None or status.epoch < self._floor_epoch:
            return
        if self._recovery is None:
            self._recovery = _Recovery()
        self._recovery.statuses[status.origin] = status.completed
        self._decided.set()

    def _side(self, view: View) -> set[str]:
        """Members of `view` reachable from here over live links, suspects excluded."""
        alive = [m for m in view.members if m not in self.suspects]
        down = set(view.down) | {
            link_key(p.subject, p.peer) for p in self._open.values() if p.kind == "link_down"
        }
        adjacency: dict[str, set[str]] = {m: set() for m in alive}
        for key in view.overlay:
            a, _, b = key.partition("|")
            if key not in down and a in adjacency and b in adjacency:
                adjacency[a].add(b)
                adjacency[b].add(a)
        seen, todo = {self.me}, [self.me]
        while todo:
            for nxt in adjacency.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    def try_decide_recovery(self, now: float) -> None:
        """As coordinator, decide the recovery view once every live member has reported."""
        if self._recovery is None or self.view is None or self._recovery.decided:
            return
        statuses = self._recovery.statuses
        base, done = self._recovery_base(max(statuses.values(), default=self.progress.completed))
        side = self._side(base)
        if min(side) != self.me:
            return
        missing = [m for m in side if m not in statuses]
        if missing:
            if now - self._recovery.started > self.cfg.failure_timeout_s:
                for member in missing:
                    self.suspect(member, now)
            return
        latest = max(statuses[m] for m in side)
        holders = [m for m in side if statuses[m] == latest]
        lagging = any(statuses[m] < latest for m in side)
        proposals = [p for p in self._open.values() if p.kind != "join" and p.id not in done]
        changes = [_change(p) for p in proposals]
        changes += [Change("crash", m) for m in self.suspects if m in base.members]
        outcome = next_view(
            base,
            changes,
            side_of=self.me,
            speeds=self._speed_table(),
            root_candidates=holders,
        )
        decision = Decision(
            id=uuid.uuid4().hex,
            origin=self.me,
            view=outcome.view.model_dump(),
            effective_step=latest + 1,
            immediate=True,
            replay_step=latest if lagging else None,
            causes=[_cause(p) for p in proposals],
        )
        self._recovery.decided = True
        self._accept_decision(decision)

    def _recovery_base(self, latest: int) -> tuple[View, set[str]]:
        """The view in force for step `latest + 1`, and the proposals it already covers.

        A planned decision effective at or before that step has been installed by the
        members that got there, so the recovery builds on it rather than on the older view.
        """
        pending = self.pending
        if pending is not None and pending.effective_step <= latest + 1:
            return View.model_validate(pending.view), {c["id"] for c in pending.causes}
        return self.view, set()

    # ------------------------------------------------------------------ messages

    def _on_message(self, sender: str, message: Message, payload: bytes) -> None:
        now = time.monotonic()
        self.liveness.heard_from(sender, now)
        if isinstance(message, Chunk):
            self.collective.deliver(sender, message, payload)
        elif isinstance(message, Heartbeat):
            self.liveness.on_heartbeat(message, now)
        elif isinstance(message, Ping):
            self.liveness.on_ping(sender, message, payload, now)
        elif isinstance(message, Pong):
            self.telemetry.on_pong(sender, message, now)
        elif isinstance(message, Proposal):
            self._on_proposal(message)
        elif isinstance(message, LinkGossip):
            self.telemetry.merge_links(message.links, self._known_link)
        elif isinstance(message, MemberStatus):
            self._on_status(message)
        elif isinstance(message, Decision):
            self._accept_decision(message)
        elif isinstance(message, JoinPlan):
            if self.sponsor.on_join_plan(message):
                self.newcomer.on_plan(message)
        elif isinstance(message, ObservedTotal):
            self.newcomer.on_total(message, payload, now)
        elif isinstance(message, StateTransfer):
            self.newcomer.on_state(sender, message, payload)

    def announce(self, proposal: Proposal) -> None:
        """Flood a proposal of this member's own that it needs no answer to here."""
        self._seen.add(proposal.id)
        self.outbox.flood(proposal)

    async def changed(self) -> None:
        """Until the protocol's state may have changed."""
        await self._wait_change()

    def heard_speed(self, member: str, samples_per_s: float) -> None:
        """The compute speed `member` announced in its latest heartbeat."""
        self._speeds[member] = samples_per_s

    def _on_proposal(self, proposal: Proposal) -> None:
        if proposal.id in self._seen:
            return
        self._seen.add(proposal.id)
        if proposal.kind == "join" and proposal.address:
            self.transport.connect(proposal.subject, proposal.address)
        self.outbox.flood(proposal)
        if proposal.kind == "join" and proposal.links:
            self.telemetry.merge_links(proposal.links, lambda _src, dst: dst == proposal.subject)
        if self.view is None or proposal.mode == "probe":
            return
        if proposal.kind == "crash" and proposal.subject == self.me:
            return  # falsely suspected: the others' recovery view leaves us out, and we stop
        self._open[proposal.id] = proposal
        self._received_at[proposal.id] = time.monotonic()
        if proposal.kind == "crash":
            self.suspects.add(proposal.subject)
            self._begin_abort()
        elif proposal.kind == "link_down" and self._on_tree(proposal.subject, proposal.peer):
            self._begin_abort()
        elif proposal.kind == "link_up" and self.view.paused:
            self.newcomer.rejoin()
        elif not self.view.paused:
            self._maybe_decide()
        self._decided.set()

    def _on_tree(self, a: str, b: str) -> bool:
        parent = self.view.parent
        return parent.get(a) == b or parent.get(b) == a

    def _on_disconnect(self, peer: str, graceful: bool) -> None:
        if not graceful and self.view is not None and peer in self.view.members:
            self.suspect(peer, time.monotonic())

    def _on_command(self, command: dict) -> None:
        kind = command.get("cmd")
        peer = str(command.get("peer", ""))
        now = time.monotonic()
        if kind == "join" and self.view is None and command.get("seed"):
            self.newcomer.order(str(command["seed"]))
        elif kind == "leave" and self.view is not None and not self._leaving:
            self._leaving = True
            self._propose("leave", self.me, now)
        elif kind == "link_down" and peer:
            self.transport.block(peer)
            self._propose("link_down", self.me, now, peer=peer)
        elif kind == "link_up" and peer:
            self.transport.unblock(peer)
            address = str(command.get("address", ""))
            if address:
                self.transport.connect(peer, address)
            self._propose("link_up", self.me, now, peer=peer)

    def _on_sigterm(self) -> None:
        """Leave at an agreed step when others train on; stop at once otherwise, or when the
        leave is not done within five failure timeouts (a second SIGTERM also stops)."""
        view = self.view
        training = view is not None and not view.paused and self.me in view.members
        if training and len(view.members) > 1 and not self._leaving:
            self._on_command({"cmd": "leave"})
            delay = 5 * self.cfg.failure_timeout_s
            asyncio.get_running_loop().call_later(delay, self._stop_now)
        else:
            self._stop_now()

    def _stop_now(self) -> None:
        raise SystemExit(0)

    def _propose(self, kind: str, subject: str, now: float, *, peer: str = "") -> None:
        proposal = Proposal(
            id=f"{kind}:{subject}:{peer}:{uuid.uuid4().hex[:8]}",
            origin=self.me,
            kind=kind,
            subject=subject,
            peer=peer,
            detected_at=now,
            epoch=self.view.epoch if self.view else -1,
        )
        self.outbox.report(
            "detected", event=kind, subject=subject, peer=peer, t=now, id=proposal.id
        )
        self._on_proposal(proposal)

    def _sync_links(self) -> None:
        """Keep outgoing links to exactly the overlay neighbours of the current view."""
        wanted = {m: self.view.members[m] for m in self.view.neighbours(self.me)}
        wanted.update({j: plan.joiner_address for j, plan in self.sponsor.observers.items()})
        if self.pending is not None:
            pending = View.model_validate(self.pending.view)
            wanted.update({m: pending.members[m] for m in pending.neighbours(self.me)})
        for peer in self.transport.peers():
            if peer not in wanted and peer != "_seed":
                self.transport.disconnect(peer, goodbye=True)
        for peer, address in wanted.items():
            if not self.transport.is_blocked(peer):
                self.transport.connect(peer, address)

    # ------------------------------------------------------------------ monitoring

    def _probe_links(self) -> None:
        """Start this member's bandwidth probes of the current round (see `probes.py`);
        none while a membership change is pending, so probes never load its switch steps."""
        if self.view is None or self.view.paused or self.pending is not None:
            return
        view = self.view
        self.telemetry.probe_links(view.overlay, view.down, view.members, self.progress.step)

    def _known_link(self, src: str, dst: str) -> bool:
        """Links between members (or newcomers) this member knows; figures about anybody
        else are not taken from a peer."""
        known = set(self.view.members if self.view else ())
        known |= set(self.sponsor.observers) | {self.me}
        return src in known and dst in known


class LinkOutbox:
    """`ports.Outbox` over the transport and the launcher's control link. Sending only
    queues frames on the transport's FIFO links, in the caller's turn: a decision flooded
    inside a message callback goes out before anything this member sends later."""

    def __init__(self, me: str, transport: TcpTransport, control: ControlLink) -> None:
        self._me = me
        self._transport = transport
        self._control = control

    def send(self, peer: str, message: WireMessage, payload: bytes | memoryview = b"") -> bool:
        return self._transport.send(peer, message, payload)

    def flood(self, message: WireMessage) -> None:
        for peer in self._transport.peers():
            self._transport.send(peer, message)

    def report(self, record: str, **fields: Any) -> None:
        log.info("%s %s", record, fields)
        self._control.report({"kind": record, "worker": self._me, **fields})

    def connect(self, peer: str, address: str) -> None:
        self._transport.connect(peer, address)

    def disconnect(self, peer: str) -> None:
        self._transport.disconnect(peer, goodbye=True)

    def peers(self) -> list[str]:
        return self._transport.peers()


def _change(proposal: Proposal) -> Change:
    return Change(proposal.kind, proposal.subject, proposal.peer, proposal.address)


def _cause(proposal: Proposal) -> dict:
    return {
        "id": proposal.id,
        "kind": proposal.kind,
        "mode": proposal.mode,
        "subject": proposal.subject,
        "peer": proposal.peer,
        "detected_at": proposal.detected_at,
    }
