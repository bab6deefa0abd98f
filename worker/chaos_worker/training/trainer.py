"""The step loop: compute this member's share of a step, all-reduce, apply, publish.

Every step, at its boundary, the protocol installs what takes effect there; then the
member computes its contribution for its samples (split by the view's speeds), all-reduces
it over the view's tree, and applies the total. What a step computes and what its total
changes is the `Sync`'s (`sync.py`: today the gradient sum and an optimizer step). The
all-reduce begins with the compute and takes each bucket as it becomes final
(`overlap.py`). After an abort the protocol decides the recovery view and this loop
replays the aborted step (`replay`) before going on.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from chaos_worker.collective import TreeAllReduce
from chaos_worker.config import WorkerConfig
from chaos_worker.membership.protocol import Membership
from chaos_worker.net.wire import Decision
from chaos_worker.ports import Clock, Outbox, Progress
from chaos_worker.replication.checkpointer import Checkpointer
from chaos_worker.replication.snapshot import SnapshotStore
from chaos_worker.telemetry.telemetry import Telemetry
from chaos_worker.training.overlap import Release
from chaos_worker.training.sampling import split_by_throughput
from chaos_worker.training.state_thread import StateThread
from chaos_worker.training.sync import Sync
from chaos_worker.training.trainspec import TrainSpec

log = logging.getLogger(__name__)


INLINE_UPDATE_S = 0.02
"""An update (the optimizer step) that took less runs on the event loop next time; the
first, and any after a longer one, on a worker thread. On a CPU the 50M mlp's held the
loop 0.2 s a step (the first much longer), long enough to go unheard past the failure
timeout; a small model's few milliseconds cost less than the thread's hand-over (the 1M
mlp's steps took 2-6 ms more CPU with every update on a thread)."""


INLINE_COMPUTE_S = 0.01
"""A compute (forward and backward) that took less, and releases the gradient whole after
it (one bucket: no hooks to overlap), runs on the event loop next time; the first, and any
after a longer one, on a worker thread. On two cores the hand-over to the thread and back
cost the 1M mlp about 3 ms of a 15 ms step (`chaos bench throughput` over TLS, Chaos over
DDP: 1.36-1.41 threaded, 1.08-1.22 inline; ADR 0003). Short, so that a membership change
waits at most that long for the loop; a compute held longer than the failure timeout on
the loop makes this member silent, and it is taken for hung (removed, and back as a
newcomer)."""


class Trainer:
    """Trains this member's share of every step until the job's last step."""

    def __init__(
        self,
        me: str,
        config: WorkerConfig,
        spec: TrainSpec,
        device: torch.device,
        *,
        sync: Sync,
        membership: Membership,
        collective: TreeAllReduce,
        store: SnapshotStore,
        telemetry: Telemetry,
        outbox: Outbox,
        progress: Progress,
        clock: Clock,
        on_reduced: Callable[[int, np.ndarray], None],
        on_stepped: Callable[[int], None],
        state_thread: StateThread,
        checkpointer: Checkpointer | None = None,
    ) -> None:
        """`sync` says what a step computes and what its total changes (`sync.py`);
        `on_reduced(step, total)` runs first when a total is applied (the root streams
        it to observers); `on_stepped(step)` after the optimizer step of a step this
        member trained (not replayed), before its snapshot is published; `state_thread`
        copies the state into snapshots (and the due ones out, with `checkpointer`), and
        every update waits for what it was asked to do before."""
        self.me = me
        self.last_total: np.ndarray | None = None
        self.loss_curve: list[tuple[int, float]] = []
        self._cfg = config
        self._spec = spec
        # one torch thread on a CPU: the computing thread's own CPU time is the work, and
        # members sharing cores (a `chaos run` on one machine) do not measure each other's
        # load; elsewhere (a GPU, several intra-op threads) wall time is
        self._measure_cpu = device.type == "cpu" and torch.get_num_threads() == 1
        self._membership = membership
        self._collective = collective
        self._store = store
        self._telemetry = telemetry
        self._out = outbox
        self._progress = progress
        self._clock = clock
        self._on_reduced = on_reduced
        self._on_stepped = on_stepped
        self._checkpointer = checkpointer
        self._op: asyncio.Future | None = None  # the all-reduce in flight
        self._state_thread = state_thread
        self._publish_s = 0.0
        self._ready_t = 0.0
        self._slice: tuple[int, int] | None = None
        """(offset, count) of this member's samples in the step's sample list."""
        self._sync = sync
        self._update_s = math.inf  # how long the last update took (`INLINE_UPDATE_S`)
        self._compute_s = math.inf  # how long the last compute took (`INLINE_COMPUTE_S`)

    def cancel_step(self) -> None:
        """Abort the all-reduce in flight (the protocol began an abort)."""
        if self._op is not None:
            self._op.cancel()

    async def run(self) -> None:
        """Train until the last step, or until this member leaves the view."""
        membership, progress = self._membership, self._progress
        while True:
            if membership.aborting:
                decision = await membership.recover()
                await self.replay(decision)
                membership.recovered(decision, self._clock())
                continue
            if await membership.at_boundary():
                return
            if progress.step >= self._cfg.steps:
                return
            self._probe_links()
            started = time.perf_counter()
            progress.started = self._clock()
            ids = self._sync.sample_ids(progress.step)
            view = membership.view
            shares = view.shares(first_step=progress.step == membership.view_step)
            split = split_by_throughput(ids, shares)
            mine = split.get(self.me, [])
            # where this member's slice starts in the step's sample list (sorted id order)
            self._slice = (sum(len(v) for m, v in split.items() if m < self.me), len(mine))
            log.debug("step %d epoch %d: %d samples", progress.step, view.epoch, len(mine))
            if membership.aborting:  # it began at the boundary: recover, send nothing
                continue
            contribution = self._collective.contribution(self._sync.buf)
            release = self._sync.start(contribution, len(mine))
            reduce = self._collective.allreduce(view, progress.step, contribution)
            self._op = op = asyncio.ensure_future(reduce)
            computing = self._compute(mine, release)
            try:
                await asyncio.wait((computing, op), return_when=asyncio.FIRST_COMPLETED)
                if op.cancelled() and membership.aborting:
                    # aborted while computing: this step will not be applied, so the
                    # coordinator may hear now how far this member got, not only once
                    # the compute thread returns (it cannot be stopped mid-backward)
                    membership.report_status()
                loss, cpu_s = await computing
            except BaseException:
                op.cancel()
                computing.cancel()  # the thread runs on; nothing waits for its result
                raise
            compute_s = time.perf_counter() - started
            self._compute_s = compute_s
            self._ready_t = self._clock()  # this member's gradient is ready to reduce
            progress.computed(len(mine), cpu_s if self._measure_cpu else compute_s)
            if not membership.aborting:  # else `cancel_step` cancelled the operation
                self._sync.stage(contribution, release, loss, len(mine))
            try:
                total = await op
            except asyncio.CancelledError:
                if not membership.aborting:
                    raise
                if contribution.lent:  # its frames may still wait in a link's queue
                    self._sync.renew()
                continue
            finally:
                self._op = None
            await self.apply(total)
            progress.step_times.append(time.perf_counter() - started)
            self._telemetry.observe_step(
                len(mine),
                compute_s,
                progress.step_times[-1],
                loss=self.loss_curve[-1][1],
                members=len(membership.view.members),
                step=progress.completed,
            )

    def _compute(self, ids: list[int], release: Release | None) -> asyncio.Future:
        """This member's share of the step, (loss, CPU seconds) when done: on the event loop
        when it is short and has no buckets to release as it goes (`INLINE_COMPUTE_S`),
        else on a worker thread."""
        if release is not None or self._compute_s >= INLINE_COMPUTE_S:
            return asyncio.ensure_future(
                asyncio.to_thread(_on_cpu_clock, self._sync.compute, ids, release)
            )
        done = asyncio.get_running_loop().create_future()
        try:
            done.set_result(_on_cpu_clock(self._sync.compute, ids, release))
        except Exception as exc:  # raised where a thread's would be: awaiting it
            done.set_exception(exc)
        return done

    def _probe_links(self) -> None:
        """This member's bandwidth probes of the current round (see `probes.py`); none
        while a membership change is pending, so probes never load its switch steps."""
        view = self._membership.view
        if view is None or view.paused or self._membership.pending is not None:
            return
        self._telemetry.probe_links(view.overlay, view.down, view.members, self._progress.step)

    async def apply(self, total: np.ndarray, *, observed: bool = False) -> None:
        """Apply the reduced total (`Sync.update`) and publish the snapshot of the next
        step where one is wanted (`observed`: a newcomer replaying, which publishes none).

        The order matters: `on_reduced` first (a newcomer's first step waits for the
        total), and the publish in flight settles before the update changes the tensors
        it copies. A long update runs on a worker thread (`INLINE_UPDATE_S`).
        """
        progress = self._progress
        self._on_reduced(progress.step, total)
        started = time.perf_counter()
        try:
            if self._update_s < INLINE_UPDATE_S:
                loss = self._sync.update(total, self.settle_publish)
            else:
                loss = await self._update_off_loop(total)
        except ValueError as exc:  # not a total of this job's steps: stop, saying where
            raise RuntimeError(f"step {progress.step}: {exc}") from exc
        self._update_s = time.perf_counter() - started
        self.last_total = total
        progress.completed = progress.step
        self.loss_curve.append((progress.step, loss))
        if observed:  # replaying: nobody pulls from an observer, so publish nothing yet
            progress.step += 1
            return
        self._on_stepped(progress.step)
        view = self._membership.view
        self._publish(progress.step + 1, view.root == self.me)
        self._out.report(
            "progress",
            step=progress.step,
            loss=loss,
            epoch=view.epoch,
            members=len(view.members),
            root=view.root,
            samples_per_s=progress.samples_per_s,
            publish_s=self._publish_s,
            ready_t=self._ready_t,
            slice=self._slice,
            t=self._clock(),
        )
        progress.step += 1

    async def _update_off_loop(self, total: np.ndarray) -> float:
        """`Sync.update` on a worker thread, awaited to its end even if cancelled (the
        state is that thread's until then). Nothing else writes or reads the state
        meanwhile: the trainer is its only writer, and what copies it waits for the
        trainer's turn."""
        updating = asyncio.ensure_future(
            asyncio.to_thread(self._sync.update, total, self.settle_publish)
        )
        try:
            return await asyncio.shield(updating)
        except asyncio.CancelledError:
            await asyncio.wait([updating])
            raise

    def _publish(self, step: int, root: bool) -> None:
        """Copy the state into snapshot `step` if a join will pull it or a checkpoint is
        due there: no other step costs a copy of the state."""
        ckpt = self._checkpointer
        writer = root or self._cfg.checkpoint_writer == "self"
        checkpoint = ckpt is not None and ckpt.claim(step, writer)
        if checkpoint or self._store.wanted(step):
            self._state_thread.submit(
                self._store.publish, step, self._spec.model, self._spec.optimizer
            )
        if checkpoint:
            # same thread, after the publish and before the next: the slot stays put
            self._state_thread.submit(ckpt.capture, self._store, step)

    async def replay(self, decision: Decision) -> None:
        """The data half of a recovery: when some member holds the total of the aborted
        step, the new root sends it down the new tree and whoever lacks it applies it;
        then this member goes on at the decision's effective step."""
        view = decision.view
        progress = self._progress
        if self.me in view.members and decision.replay_step is not None and not view.paused:
            total = await self._collective.broadcast(view, decision.replay_step, self.last_total)
            if progress.completed < decision.replay_step:
                self._slice = None  # the total of others' attempt: nothing computed here
                await self.apply(total)
        if self.me in view.members:
            progress.step = decision.effective_step

    def settle_publish(self) -> None:
        """Wait for the state copies in flight (before the tensors change); time the wait."""
        waited = self._state_thread.settle()
        self._publish_s = self._publish_s if waited is None else waited

    def close(self) -> None:
        """Settle the last copies and stop the state thread."""
        self.settle_publish()
        self._state_thread.close()


def _on_cpu_clock(
    compute: Callable[[Sequence[int], Release | None], float],
    ids: list[int],
    release: Release | None,
) -> tuple[float, float]:
    """`compute(ids, release)` and the CPU seconds the calling thread spent on it."""
    before = time.thread_time()
    loss = compute(ids, release)
    return loss, time.thread_time() - before
