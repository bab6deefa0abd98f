"""One member of an elastic job: the composition root of a worker process.

`Member` builds the transport, the snapshot store and its replicator, and the roles that
do the work, and wires them together:

* `membership.protocol.Membership`: proposals, decisions, recovery, partitions (the
  protocol itself is described there);
* `membership.liveness.Liveness`: heartbeats and the failure detector;
* `training.trainer.Trainer`: the step loop and the replay of an aborted step;
* `join.newcomer.Newcomer` and `join.sponsor.JoinSponsor`: the two sides of a join;
* `telemetry.telemetry.Telemetry`: link figures, step and replication metrics.

Roles send through one `LinkOutbox` (`ports.Outbox`) and hear of each other through the
listeners wired here; incoming frames go to them through one dispatch table.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from chaos_worker.collective import TreeAllReduce
from chaos_worker.config import WorkerConfig
from chaos_worker.join.activation import watch as watch_order
from chaos_worker.join.newcomer import SEED, Newcomer
from chaos_worker.join.sponsor import JoinSponsor
from chaos_worker.membership.joiners import JoinerCheck, OwnAdmission
from chaos_worker.membership.listeners import Listeners
from chaos_worker.membership.liveness import Liveness
from chaos_worker.membership.protocol import Membership
from chaos_worker.membership.view import View, full_mesh, initial_view
from chaos_worker.net.bounds import Guard, Limits, Rejections
from chaos_worker.net.control import ControlLink
from chaos_worker.net.shaping import TokenBucket, delays_only, parse_links, shape_for
from chaos_worker.net.signing import Gate, Signer, Verifier
from chaos_worker.net.tls import LinkTls
from chaos_worker.net.transport import TcpTransport, Transport, TransportFactory
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
    StateWitness,
    WireMessage,
)
from chaos_worker.ports import Progress
from chaos_worker.priority import ignore_from_now
from chaos_worker.replication.checkpoint import CheckpointError, load_checkpoint, resolve
from chaos_worker.replication.checkpointer import Checkpointer
from chaos_worker.replication.ledger import HANDSHAKES_FILE, REFUSED_FILE, SentReader
from chaos_worker.replication.replicator import Replicator
from chaos_worker.replication.sidecar import Child, EarlyReplicator, spawn_replicator
from chaos_worker.replication.snapshot import state_digest
from chaos_worker.replication.space import open_store
from chaos_worker.telemetry.metrics import WorkerMetrics
from chaos_worker.telemetry.telemetry import Telemetry
from chaos_worker.training.staging import host_alloc
from chaos_worker.training.state_thread import StateThread
from chaos_worker.training.sync import GradientSync, gradient_layout
from chaos_worker.training.trainer import Trainer
from chaos_worker.training.trainspec import TrainSpec

LINGER_TIMEOUTS = 2
"""How long (in failure timeouts) a member that ended the job waits for the others to end
it too before it exits."""

log = logging.getLogger(__name__)

Handler = Callable[[str, Any, bytes, float], None]
"""(sender, message, payload, arrival time) of one incoming frame."""


class Member:
    """A worker process: its transport, snapshot store, replicator and roles."""

    def __init__(
        self,
        config: WorkerConfig,
        spec: TrainSpec,
        device: torch.device,
        *,
        transport_factory: TransportFactory | None = None,
        phases: dict[str, float] | None = None,
        early: EarlyReplicator | None = None,
    ) -> None:
        """`transport_factory` builds the member's links (default: TCP, with the mutual TLS
        of `config.tls` if set; `LoopTransport` in one process); `phases`: when the
        start-up's phases ended so far (monotonic), completed here and sent with `ready`;
        `early`: the private directory and its replicator process, started already."""
        self.phases = {} if phases is None else phases
        self.cfg = config
        self.me = me = config.id
        metrics = WorkerMetrics(me) if config.metrics_port is not None else None
        if transport_factory is None:
            count = metrics.observe_refused_handshake if metrics else None
            tls = LinkTls(config.tls, me, count=count) if config.tls else None
            transport_factory = TcpTransport.secured(tls)
        self.spec = spec
        self.address = config.listen
        shapes = parse_links(config.links)
        wire = delays_only(shapes) if config.kernel_shaped else shapes  # tc shapes the rates
        downlink = config.downlink_bytes_per_s
        rejections = Rejections(metrics.observe_rejected if metrics else None)
        limits = Limits(chunk_bytes=config.bucket_bytes, state_bytes=config.max_state_bytes)
        self.transport = transport_factory(
            me,
            self._on_message,
            self._on_disconnect,
            max_payload=limits.largest,
            shape=lambda peer: shape_for(wire, me, peer),
            downlink=TokenBucket(downlink) if downlink else None,
        )
        self.transport.guard = Guard(limits, rejections)
        self.control = ControlLink(config.control, self._on_command)
        signer = Signer(config.tls, me) if config.tls else None
        self.outbox = outbox = LinkOutbox(me, self.transport, self.control, signer)
        verifier = Verifier(config.tls.ca) if config.tls else None
        self.gate = Gate(verifier, rejections, self._known_views) if verifier else None
        own: OwnAdmission | None = None
        if verifier is not None and config.tls is not None and config.tls.admission:
            own = OwnAdmission(config.tls, verifier)
        elif verifier is not None:
            log.warning("no admission in the TLS files: joiners are not checked for one")
        self.joiners = JoinerCheck(own, verifier, rejections) if own and verifier else None
        inline = config.replicator == "inline" and not config.replicator_address
        # slots allocated where they fit; a private directory (removed at exit) unless one
        # is configured; `early`'s replicator is moved along if its directory has no room
        store, self._owned_dir = open_store(config, spec, early)
        self.store = store
        size, dtype = gradient_layout(spec)
        self.collective = collective = TreeAllReduce(
            me,
            self.transport.send,
            size=size,
            dtype=dtype,
            bucket_bytes=config.bucket_bytes,
            expects=lambda sender, epoch, step: membership.expects(sender, epoch, step),
            reject=rejections,
            on_bad=self._on_bad_contribution,
            alloc=host_alloc(device),
        )
        clock = time.monotonic
        self.progress = progress = Progress()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.resumed = self._resume(config, spec, device) if config.members else None
        self.checkpoint_step: int | None = None
        """The newest checkpoint this member wrote or resumed from (its termination message)."""
        if self.resumed is not None:
            progress.step = self.resumed["step"]
            progress.completed = progress.step - 1
            if self.resumed["path"] is not None:
                self.checkpoint_step = progress.step
            if metrics is not None:
                metrics.observe_resumed(self.resumed["step"], self.resumed["skipped"])
        self.checkpointer = (
            Checkpointer(
                Path(config.checkpoint_dir),
                dtype=config.dtype,
                last_step=config.steps,
                every_steps=config.checkpoint_every_steps,
                every_s=config.checkpoint_every_s,
                keep=config.checkpoint_keep,
                on_written=self._on_checkpoint,
                start_step=progress.step,
                job=job_identity(config),
            )
            if config.checkpoint_dir
            else None
        )
        self.telemetry = telemetry = Telemetry(me, outbox=outbox, clock=clock, metrics=metrics)
        hooks = Listeners()
        self.membership = membership = Membership(
            me,
            outbox=outbox,
            clock=clock,
            progress=progress,
            telemetry=telemetry,
            failure_timeout_s=config.failure_timeout_s,
            down_sent=lambda: collective.down_sent,
            listeners=hooks,
            reject=rejections,
        )
        common = {"outbox": outbox, "progress": progress, "clock": clock}
        self.liveness = liveness = Liveness(
            me,
            heartbeat_interval_s=config.heartbeat_interval_s,
            failure_timeout_s=config.failure_timeout_s,
            membership=membership,
            telemetry=telemetry,
            **common,
        )
        state_thread = StateThread()  # whole-state copies, off the event loop
        self.sponsor = sponsor = JoinSponsor(
            me,
            config,
            spec,
            membership=membership,
            replicators=liveness.replicators,
            shapes=shapes,
            store=store,
            telemetry=telemetry,
            totals_sent=lambda: collective.down_sent,
            state_thread=state_thread,
            **common,
        )
        sync = GradientSync(config, spec, device, collective)
        self.trainer = trainer = Trainer(
            me,
            config,
            spec,
            device,
            sync=sync,
            membership=membership,
            collective=collective,
            store=store,
            telemetry=telemetry,
            on_reduced=sponsor.stream_to_observers,
            on_stepped=sponsor.release_pins,
            state_thread=state_thread,
            checkpointer=self.checkpointer,
            **common,
        )
        self.newcomer = newcomer = Newcomer(
            me,
            config,
            spec,
            device,
            membership=membership,
            liveness=liveness,
            trainer=trainer,
            collective=collective,
            store=store,
            state_thread=state_thread,
            telemetry=telemetry,
            reject=rejections,
            transport_factory=transport_factory,
            verifier=verifier,
            admission=own.current if own else None,
            **common,
        )
        membership.silence = liveness.silence
        hooks.aborting.append(trainer.cancel_step)
        hooks.admitted += [lambda _d, _old, new, _send: liveness.admit(new), sponsor.admit]
        hooks.installed.append(self._sync_links)
        hooks.joining.append(newcomer.on_decision)
        hooks.rejoin.append(newcomer.rejoin)
        hooks.plan_join = sponsor.plan_join
        self.transport.place = lambda sender, message, nbytes: (
            newcomer.place_state(sender, message, nbytes)
            if isinstance(message, StateTransfer)
            else collective.place(sender, message, nbytes)
        )
        self._handlers: dict[type, Handler] = {
            Chunk: lambda sender, m, payload, _: collective.deliver(sender, m, payload),
            Heartbeat: lambda _, m, __, now: liveness.on_heartbeat(m, now),
            Ping: liveness.on_ping,
            Pong: lambda sender, m, _, now: telemetry.on_pong(sender, m, now),
            Proposal: self._on_proposal,
            LinkGossip: lambda _, m, __, ___: telemetry.merge_links(m.links, self._known_link),
            MemberStatus: lambda _, m, __, now: membership.on_status(m, now),
            Decision: lambda _, m, __, now: membership.on_decision(m, now),
            JoinPlan: self._on_join_plan,
            ObservedTotal: newcomer.on_total,
            StateTransfer: lambda sender, m, payload, _: newcomer.on_state(sender, m, payload),
            StateWitness: lambda sender, m, _payload, _: newcomer.on_witness(sender, m),
        }
        self.replicator = (
            Replicator(
                me,
                store,
                shape=lambda peer: shape_for(wire, me, peer),
                on_sent=lambda peer, n: telemetry.count_replication(peer, "sent", n),
                transport_factory=transport_factory,
                signer=signer,
                reject=rejections,
            )
            if inline
            else None
        )
        self._child: Child | None = early.child if early is not None else None
        self._tasks: list[asyncio.Task] = []

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Join or start the job, train until the last step, then leave cleanly."""
        host = self.cfg.listen.rpartition(":")[0]
        # the replicator first: starting a process takes a while, and once this member
        # listens, the others' messages (a probe) need answers on links not yet opened
        self.liveness.replicators[self.me] = await self._start_replicator(host)
        self.phases["replicator"] = time.monotonic()
        port = await self.transport.listen(host, int(self.cfg.listen.rpartition(":")[2]))
        self.address = self.newcomer.address = f"{host}:{port}"
        await self.control.open()
        metrics = self.telemetry.metrics
        metrics_port = metrics.serve(host, self.cfg.metrics_port) if metrics else None
        self.phases["connected"] = time.monotonic()
        self.outbox.report(
            "ready", address=self.address, metrics_port=metrics_port, phases=self.phases
        )
        self._loop = loop = asyncio.get_running_loop()
        if self.resumed is not None:
            self.outbox.report("resumed", **self.resumed)
        self._tasks = [
            loop.create_task(self.liveness.heartbeats()),
            loop.create_task(self.liveness.watch()),
        ]
        if self.cfg.standby and self.cfg.standby_file:  # a spare pod: its order is a new config
            order = watch_order(self.cfg.standby_file, self.cfg, self.newcomer.order)
            self._tasks.append(loop.create_task(order))
        if self.cfg.control is None:  # in a pod: deletion (SIGTERM) is a graceful leave
            loop.add_signal_handler(signal.SIGTERM, self._on_sigterm)
        if self.cfg.members:
            members = {**self.cfg.members, self.me: self.address}
            self.membership.begin(initial_view(members, self.cfg.overlay or full_mesh(members)))
            self._sync_links()
        else:
            await self.newcomer.join(standby=self.cfg.standby)
        try:
            await self.trainer.run()
            view = self.membership.view
            if self.progress.step >= self.cfg.steps and view is not None and not view.paused:
                patience = LINGER_TIMEOUTS * self.cfg.failure_timeout_s
                await self.liveness.finished(view.members, self.cfg.steps, patience)
        finally:
            if self.cfg.control is None:
                ignore_from_now(loop, [signal.SIGTERM])
            for task in self._tasks:
                task.cancel()
            self.trainer.close()
            if self.checkpointer is not None:  # the final state's checkpoint is written
                self.checkpointer.close()
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

    @staticmethod
    def _resume(config: WorkerConfig, spec: TrainSpec, device: torch.device) -> dict | None:
        """Load `config.resume_from` (a checkpoint, or the newest sound one in a checkpoint
        directory) into the model and optimizer; what was loaded (None: nothing to resume).
        CheckpointError if there is no sound checkpoint there."""
        if not config.resume_from:
            return None
        skipped: list[str] = []

        def skip(path: Path, why: str) -> None:
            log.warning("skipping checkpoint %s: %s", path, why)
            skipped.append(f"{path.name}: {why}")

        try:
            path, _ = resolve(Path(config.resume_from), config.max_state_bytes, skip)
        except CheckpointError as exc:
            if config.resume_required:
                raise
            log.warning("starting at step 0: %s", exc)
            return {"step": 0, "path": None, "skipped": skipped}
        manifest = load_checkpoint(path, spec.model, spec.optimizer, device, config.max_state_bytes)
        if manifest.dtype != config.dtype:
            raise CheckpointError(f"{path} holds {manifest.dtype} state, the job is {config.dtype}")
        return {"step": manifest.step, "path": str(path), "skipped": skipped}

    def _on_checkpoint(self, record: dict) -> None:
        """A checkpoint was written (the writer thread): report it from the event loop."""
        self.checkpoint_step = record["step"]
        if self.telemetry.metrics is not None:
            self.telemetry.metrics.checkpoint_step.set(record["step"])
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(lambda: self.outbox.report("checkpoint", **record))

    async def _start_replicator(self, host: str) -> str:
        """Serve snapshots (see `WorkerConfig.replicator`); returns the address to advertise."""
        if self.replicator is not None:
            return await self.replicator.start(host)
        assert self.store.directory is not None
        self.telemetry.served = SentReader(self.store.directory).news
        self.telemetry.refused = SentReader(self.store.directory, REFUSED_FILE).news
        self.telemetry.refused_handshakes = SentReader(self.store.directory, HANDSHAKES_FILE).news
        if self.cfg.replicator_address:
            return self.cfg.replicator_address
        if self._child is None:
            self._child = spawn_replicator(self.cfg, self.store.directory)
        await self._child.serving()
        return self._child.address

    async def _stop_replicator(self) -> None:
        if self.replicator is not None:
            await self.replicator.close()
        if self._child is not None:
            await self._child.stop()
        if self._owned_dir is not None:
            self._owned_dir.remove()

    # ------------------------------------------------------------------ events

    def _on_message(self, sender: str, message: Message, payload: bytes) -> None:
        """Every incoming frame, in arrival order per link. Handlers forward what they
        flood before returning, so a decision precedes this link's next frame everywhere."""
        now = time.monotonic()
        self.liveness.heard_from(sender, now)
        if self.gate is not None and not self.gate.admit(sender, message):
            return  # forged: neither acted on nor forwarded
        if self.joiners is not None and not self.joiners.admit(message):
            return  # a join its party did not admit to this job: changes nothing
        handler = self._handlers.get(type(message))
        if handler is not None:
            handler(sender, message, payload, now)

    def _known_views(self) -> list[View]:
        """The views this member trains in, in force and next (none while paused)."""
        view, pending = self.membership.view, self.membership.pending
        if view is None or view.paused:
            return []
        return [view] if pending is None else [view, pending.view]

    def _on_proposal(self, _sender: str, proposal: Proposal, _payload: bytes, now: float) -> None:
        if proposal.mode == "probe":  # a newcomer's, its seal checked: answer its probe
            self.sponsor.expect_probe(proposal)
        self.membership.on_proposal(proposal, now)

    def _on_join_plan(self, _sender: str, plan: JoinPlan, _payload: bytes, _now: float) -> None:
        if self.sponsor.on_join_plan(plan):  # new, and for this member's own join
            self.newcomer.on_plan(plan)

    def _on_bad_contribution(self, sender: str) -> None:
        """`sender` sent a bucket of the step in progress that cannot be summed (wrong
        length, NaN or infinity): the step is redone without it, as after its crash. The
        link that carried it names its sender (mutual TLS), so nobody else is blamed."""
        log.warning("%s sent an unusable gradient bucket: the step is redone without it", sender)
        self.membership.suspect(sender, time.monotonic(), confirmed=True)

    def _on_disconnect(self, peer: str, graceful: bool) -> None:
        view = self.membership.view
        if not graceful and view is not None and peer in view.members:
            loop = asyncio.get_running_loop()
            self._tasks.append(loop.create_task(self._confirm(peer, view.members[peer])))

    async def _confirm(self, peer: str, address: str) -> None:
        """A link from `peer` ended without a goodbye. If nothing accepts connections at
        its address any more, it crashed (confirmed); if it answers, only the link was
        reset; if it does not answer within half the failure timeout, it is suspected."""
        alive = await self.transport.reachable(address, self.cfg.failure_timeout_s / 2)
        now = time.monotonic()
        if alive:
            self.membership.reset(peer, now)
        else:
            self.membership.suspect(peer, now, confirmed=alive is False)

    def _on_command(self, command: dict) -> None:
        """A command from the launcher: join (a standby), leave, link_down, link_up."""
        kind = command.get("cmd")
        peer = str(command.get("peer", ""))
        now = time.monotonic()
        membership = self.membership
        if kind == "join" and membership.view is None and command.get("seed"):
            others = command.get("seeds")
            others = [str(a) for a in others[:64]] if isinstance(others, list) else []
            self.newcomer.order(str(command["seed"]), others)
        elif kind == "leave":
            membership.leave(now)
        elif kind == "link_down" and peer:
            self.transport.block(peer)
            membership.propose("link_down", self.me, now, peer=peer)
        elif kind == "link_up" and peer:
            self.transport.unblock(peer)
            address = str(command.get("address", ""))
            if address:
                self.transport.connect(peer, address)
            membership.propose("link_up", self.me, now, peer=peer)

    def _on_sigterm(self) -> None:
        """Leave at an agreed step when others train on; stop at once otherwise, or when the
        leave is not done within five failure timeouts (a second SIGTERM also stops)."""
        view = self.membership.view
        training = view is not None and not view.paused and self.me in view.members
        if training and len(view.members) > 1 and not self.membership.leaving:
            self._on_command({"cmd": "leave"})
            delay = 5 * self.cfg.failure_timeout_s
            asyncio.get_running_loop().call_later(delay, self._stop_now)
        else:
            self._stop_now()

    def _stop_now(self) -> None:
        raise SystemExit(0)

    def _sync_links(self) -> None:
        """Keep outgoing links to exactly the overlay neighbours of the current view (and
        of the pending one), plus the observing newcomers."""
        view = self.membership.view
        wanted = {m: view.members[m] for m in view.neighbours(self.me)}
        wanted.update({j: plan.joiner_address for j, plan in self.sponsor.observers.items()})
        if self.membership.pending is not None:
            pending = self.membership.pending.view
            wanted.update({m: pending.members[m] for m in pending.neighbours(self.me)})
        for peer in self.transport.peers():
            if peer not in wanted and peer != SEED:
                self.transport.disconnect(peer, goodbye=True)
        for peer, address in wanted.items():
            if not self.transport.is_blocked(peer):
                self.transport.connect(peer, address)

    def _known_link(self, src: str, dst: str) -> bool:
        """Links between members (or newcomers) this member knows; figures about anybody
        else are not taken from a peer."""
        view = self.membership.view
        known = set(view.members if view else ()) | set(self.sponsor.observers) | {self.me}
        return src in known and dst in known


def job_identity(config: WorkerConfig) -> dict[str, str | int]:
    """What a checkpoint must share with the job that resumes from it."""
    return {"entry": config.entry, "seed": config.seed, "global_batch": config.global_batch}


class LinkOutbox:
    """`ports.Outbox` over the transport and the launcher's control link. Sending only
    queues frames on the transport's FIFO links, in the caller's turn: a decision flooded
    inside a message callback goes out before anything this member sends later."""

    def __init__(
        self, me: str, transport: Transport, control: ControlLink, signer: Signer | None = None
    ) -> None:
        """`signer`: seals the flooded messages this member makes (with TLS)."""
        self._me = me
        self._transport = transport
        self._control = control
        self._seal = signer.seal if signer is not None else lambda message: message

    def send(self, peer: str, message: WireMessage, payload: bytes | memoryview = b"") -> bool:
        return self._transport.send(peer, self._seal(message), payload)

    def flood(self, message: WireMessage) -> None:
        message = self._seal(message)
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
