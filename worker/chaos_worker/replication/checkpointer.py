"""When to write a checkpoint, and writing it off the step loop.

One member writes: the root of the view in force when a step's total is applied (every
member knows the view, so exactly one member takes it on; in `chaos run` that is one member
of the run's one party). A checkpoint is due at the first published snapshot at or past a
multiple of `checkpoint_every_steps`, when `checkpoint_every_s` seconds have passed since
this member's last one, and always for the job's final state (snapshot `steps`).

The step loop never waits for a checkpoint. `capture` runs on the trainer's snapshot
thread right after the publish of the due step, before the next publish can start: it only
holds that snapshot's slot (`SnapshotStore.hold`: publishes then go to the other slot, as
when a join pins one), so a slot is never read while it is reused. A writer thread at lower
priority then copies the slot into a private buffer and lets the slot go (the hold lasts one
memory copy), then encodes, hashes and writes the copy (`checkpoint.write_checkpoint`).
While it is busy, a newer due step replaces the one waiting, so slow storage makes
checkpoints sparser, never training slower.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from chaos_worker.priority import lower_this_thread
from chaos_worker.replication.checkpoint import write_checkpoint
from chaos_worker.replication.snapshot import Snapshot, SnapshotStore

log = logging.getLogger(__name__)


@dataclass
class Captured:
    """One held snapshot, waiting for the writer to copy it out and write it."""

    step: int
    store: SnapshotStore
    snapshot: Snapshot
    final: bool


Written = Callable[[dict], None]
"""Told of every checkpoint written: step, path, final, bytes, copy_s, write_s."""


class Checkpointer:
    """Policy and writer thread of one member's checkpoints (module docstring)."""

    def __init__(
        self,
        root: Path,
        *,
        dtype: str,
        last_step: int,
        every_steps: int | None,
        every_s: float | None,
        keep: int,
        on_written: Written | None = None,
        start_step: int = 0,
        job: dict[str, str | int] | None = None,
    ) -> None:
        """`last_step`: the job's final state is snapshot `last_step` (its `steps`);
        `start_step`: the step training starts from (a resumed run's checkpoint); `job`:
        entry, seed and global batch, recorded in the manifest."""
        self.root = root
        self._dtype = dtype
        self._last_step = last_step
        self._every_steps = every_steps
        self._every_s = every_s
        self._keep = keep
        self._job = job or {}
        self._on_written = on_written
        self._done = start_step  # the newest step captured (or resumed from)
        self._done_t = time.monotonic()
        self._waiting: Captured | None = None
        self._claims: dict[int, tuple[int, float]] = {}  # step -> what it was before its claim
        self._busy = False
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._write_loop, name="checkpoint", daemon=True)
        self._thread.start()
        self.errors: list[str] = []

    def due(self, step: int, writer: bool) -> bool:
        """Whether snapshot `step`, about to be published, should be captured here (and
        is not claimed yet)."""
        if not writer or step <= self._done:
            return False
        if step >= self._last_step:
            return True
        every = self._every_steps
        if every and step // every > self._done // every:
            return True
        return bool(self._every_s) and time.monotonic() - self._done_t >= self._every_s

    def claim(self, step: int, writer: bool) -> bool:
        """`due`, and if so taken at once (the trainer then queues `capture`): the next
        steps are not due again while the copy waits on the state thread. A capture
        that finds no snapshot gives the claim back."""
        with self._cond:
            if not self.due(step, writer):
                return False
            self._claims[step] = (self._done, self._done_t)
            self.taken(step)
            return True

    def taken(self, step: int) -> None:
        """Snapshot `step` was captured: the next one is due an interval later."""
        self._done, self._done_t = step, time.monotonic()

    def capture(self, store: SnapshotStore, step: int) -> None:
        """Hold snapshot `step` and hand it to the writer (run on the thread that
        publishes, after the publish and before the next one)."""
        snapshot = store.hold(step)
        with self._cond:
            before = self._claims.pop(step, None)
            if snapshot is None:  # not published (no free slot): due again next step
                if before is not None and self._done == step:
                    self._done, self._done_t = before
                return
            replaced, self._waiting = (
                self._waiting,
                Captured(step, store, snapshot, final=step >= self._last_step),
            )
            self._cond.notify_all()
        if replaced is not None:
            log.info("checkpoint of step %d skipped: a newer one is due", replaced.step)
            replaced.store.unhold(replaced.step)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every captured checkpoint is written; False on timeout."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self._waiting is None and not self._busy, timeout=timeout_s
            )

    def close(self, timeout_s: float | None = None) -> None:
        """Write what is captured, then stop the writer thread."""
        self.flush(timeout_s)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout_s)

    def _write_loop(self) -> None:
        lower_this_thread()
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._waiting is not None or self._closed)
                if self._waiting is None:
                    return
                item, self._waiting, self._busy = self._waiting, None, True
            try:
                self._write(item)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    @staticmethod
    def _copy_out(item: Captured) -> bytearray:
        """A private copy of the held slot (releases the GIL); the slot is let go."""
        import torch

        try:
            total = item.snapshot.layout.total_bytes
            data = bytearray(max(total, 1))
            if total:
                with warnings.catch_warnings():  # the read-only slot view is only read
                    warnings.simplefilter("ignore", UserWarning)
                    source = torch.frombuffer(item.snapshot.data, dtype=torch.uint8, count=total)
                torch.frombuffer(data, dtype=torch.uint8, count=total).copy_(source)
            return data
        finally:
            item.store.unhold(item.step)

    def _write(self, item: Captured) -> None:
        started = time.perf_counter()
        try:
            data = self._copy_out(item)
            copied = time.perf_counter()
            path = write_checkpoint(
                self.root,
                item.step,
                item.snapshot.layout,
                data,
                dtype=self._dtype,
                final=item.final,
                keep=self._keep,
                job=self._job,
            )
        except (OSError, ValueError, RuntimeError, MemoryError) as exc:
            why = f"checkpoint of step {item.step} not written: {exc}"
            log.warning("%s", why)
            self.errors.append(why)
            return
        record = {
            "step": item.step,
            "path": str(path),
            "final": item.final,
            "bytes": item.snapshot.layout.total_bytes,
            "copy_s": copied - started,
            "write_s": time.perf_counter() - copied,
        }
        log.info("checkpoint %s", record)
        if self._on_written is not None:
            self._on_written(record)
