"""Tree all-reduce over the overlay: partial sums flow up to the root, totals flow down.

The flat buffer is cut into buckets; a member forwards bucket `i` as soon as it holds
bucket `i` of its own (`Contribution.ready`) and from every child, and the root starts
sending totals of bucket `i` down before other buckets have arrived, so a large model
streams through the tree instead of waiting for the whole gradient at every hop. Every
member takes the buckets in descending index order, the order in which backward makes
them final (it runs from the last layer), so a member's first buckets can travel while
its backward still runs. Cancelling the awaiting task aborts the operation.

A leaf sends its own buckets as they are (`Contribution.lent`: the owner must not write
that buffer again once an operation on it was abandoned, since a link may still hold its
frames), and a member below the root has each total read straight into its slice of the
result where the transport can (`place`), so neither copies its buffer. A member with
children has its first child's partial sums read into the result the same way, and adds
its own to them there (in place, one pass fewer than into a third buffer).

Every buffer of a job has the same size and dtype, so every bucket has a known length. A
bucket that arrives is checked before it is held: one of the wrong length or count, with
a NaN or an infinity, or for an operation this member does not expect (`expects`: from a
member of no view it knows, or past the newest epoch and step it knows of) is refused
(counted, never held) and the operation goes on waiting for a valid one. Buckets of
operations ahead of the current one are held for at most `MAX_AHEAD_OPS` operations.
A malformed or non-finite bucket for the operation in progress is reported to `on_bad`:
the member then takes its sender for crashed (a confirmed crash: see `Member`), so the
step is redone without it and it must come back as a newcomer (`docs/security.md`).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

import numpy as np

from chaos_worker.membership.view import View
from chaos_worker.net.bounds import Reject, Rejections
from chaos_worker.net.wire import Chunk, Message

Op = tuple[int, int]  # epoch, step
Bucket = tuple[str, int, str]  # phase, bucket index, sender
Send = Callable[[str, Chunk, bytes | memoryview], bool]
Expects = Callable[[str, int, int], bool]
"""Whether a bucket from `sender` for the all-reduce of (epoch, step) may come."""
Alloc = Callable[[int, np.dtype], np.ndarray]
"""An uninitialised array of (elements, dtype): where totals and contributions live
(`np.empty`; page-locked memory for a model on a GPU, `training/staging.py`)."""

BAD_CONTRIBUTION = ("malformed", "nonfinite")
"""Refusals that show a sender's bucket for the operation in progress unusable: `on_bad`
hears of them, and the member has the step redone without that sender."""

MAX_AHEAD_OPS = 8
"""Operations (epoch, step) whose buckets may be held before they begin here: in practice
the next step, and the first step of a view decided but not yet in force."""


class NonFiniteGradient(RuntimeError):
    """This member's own contribution to a step is not finite: it stops, loudly, rather
    than send what every receiver refuses."""


class Contribution:
    """This member's buffer for one all-reduce, handed over bucket by bucket: the operation
    reads bucket `i` of `buf` only once `ready(i)` has been called, so whoever writes `buf`
    (backward, in another thread) releases each bucket as it becomes final.

    `ready` runs on the event loop's thread (from another: `loop.call_soon_threadsafe`);
    it may come more than once, and after the operation is over or cancelled, to no effect.
    """

    def __init__(self, buf: np.ndarray, buckets: int) -> None:
        self.buf = buf
        self._ready = [asyncio.Event() for _ in range(buckets)]
        self.lent = False
        """Whether a bucket of `buf` itself (not a copy) was handed to the transport: if the
        operation is abandoned, a link may read `buf` later, so it must not be written."""

    def ready(self, index: int) -> None:
        """Bucket `index` of `buf` is final."""
        self._ready[index].set()

    def ready_all(self) -> None:
        """All of `buf` is final."""
        for event in self._ready:
            event.set()

    async def wait(self, index: int) -> None:
        """Until bucket `index` is final."""
        await self._ready[index].wait()


class TreeAllReduce:
    """All-reduce (sum) of a flat numpy buffer of `size` elements of `dtype` over the tree
    of a view."""

    def __init__(
        self,
        me: str,
        send: Send,
        *,
        size: int,
        dtype: np.dtype | type,
        bucket_bytes: int = 4 << 20,
        expects: Expects = lambda _sender, _epoch, _step: True,
        reject: Reject | None = None,
        on_bad: Callable[[str], None] | None = None,
        alloc: Alloc = np.empty,
    ) -> None:
        self.me = me
        self._send = send
        self.bucket_bytes = bucket_bytes
        self.size = size
        self.dtype = np.dtype(dtype)
        self._per = max(1, bucket_bytes // self.dtype.itemsize)
        self._count = max(1, math.ceil(size / self._per))
        self._expects = expects
        self._reject = reject or Rejections()
        self._on_bad = on_bad
        self._alloc = alloc
        self._at: Op = (-1, -1)
        """The operation begun last: buckets of earlier ones are over here."""
        self._inbox: dict[Op, dict[Bucket, bytes]] = {}
        self._waiting: dict[tuple[Op, Bucket], asyncio.Future] = {}
        self._sinks: dict[tuple[Op, Bucket], np.ndarray] = {}
        """Slices of a result that awaited buckets may be read straight into (`place`)."""
        self._placed: dict[tuple[Op, Bucket], np.ndarray] = {}
        """Slices given to a frame that is still being read into them (`place`)."""
        self.down_sent: tuple[int, int] | None = None
        """(epoch, step) of the last all-reduce whose totals this member, as root, began
        to send down: anything it sends before that precedes the totals on every path."""

    @property
    def buckets(self) -> int:
        """Buckets a buffer is cut into."""
        return self._count

    @property
    def bucket_elements(self) -> int:
        """Elements in every bucket but the last."""
        return self._per

    @property
    def held(self) -> int:
        """Buckets held for operations that have not awaited them yet."""
        return sum(len(buckets) for buckets in self._inbox.values())

    def deliver(self, sender: str, chunk: Chunk, payload: bytes) -> None:
        """Hand over a bucket received from `sender` (may arrive before it is awaited);
        one that is not valid or not expected is refused (see the module docstring)."""
        op = (chunk.epoch, chunk.step)
        if op < self._at:
            return  # an earlier operation's (normal after an abort): it is over here
        bucket = (chunk.phase, chunk.index, sender)
        placed = self._placed.get((op, bucket))
        if placed is not None:
            if not _same_memory(np.frombuffer(payload, np.uint8), placed):
                # another copy while the placed frame is still being written into the result:
                # taking it would let that frame change the result once it was checked
                self._reject(sender, "unexpected", f"{_where(chunk)}: a second copy of it")
                return
            del self._placed[(op, bucket)]
        fault = self._fault(sender, chunk, payload)
        if fault is not None:
            self._reject(sender, *fault)
            if fault[0] in BAD_CONTRIBUTION and op == self._at and self._on_bad is not None:
                self._on_bad(sender)  # the operation in progress cannot use it: redo it
            return
        future = self._waiting.pop((op, bucket), None)
        if future is not None and not future.done():
            future.set_result(payload)
        else:
            self._inbox.setdefault(op, {}).setdefault(bucket, payload)  # the first one holds

    def place(self, sender: str, message: Message, nbytes: int) -> memoryview | None:
        """Where the transport may read the `nbytes` of payload of `message` from `sender`
        (a `receiver.Place`): for a bucket, the slice of the result this member awaits it
        for, once, when it is of that slice's size; else None (a buffer of the transport's
        own). What is read there is checked by `deliver` as any bucket is, and a refused one
        is overwritten by the valid one; until it is delivered, another copy of that bucket
        is refused (its frame may still be writing the slice)."""
        if not isinstance(message, Chunk):
            return None
        key = ((message.epoch, message.step), (message.phase, message.index, sender))
        sink = self._sinks.get(key)
        if sink is None or sink.nbytes != nbytes:
            return None
        del self._sinks[key]  # the first one holds: a second is read to a buffer of its own
        self._placed[key] = sink
        return memoryview(sink).cast("B")

    def _fault(self, sender: str, chunk: Chunk, payload: bytes) -> tuple[str, str] | None:
        """(reason, detail) when `chunk` with `payload` is refused, else None."""
        op = (chunk.epoch, chunk.step)
        where = _where(chunk)
        if chunk.count != self._count:
            return "malformed", f"{where}: {chunk.count} buckets, not {self._count}"
        if not self._expects(sender, *op):
            return "unexpected", f"{where}: no such operation is known here"
        if op not in self._inbox and op != self._at and len(self._inbox) >= MAX_AHEAD_OPS:
            return "unexpected", f"{where}: {MAX_AHEAD_OPS} operations ahead already held"
        fault = _numbers_fault(payload, self._span(chunk.index), self.dtype)
        return None if fault is None else (fault[0], f"{where}: {fault[1]}")

    def check_total(self, dtype: str, payload: bytes) -> tuple[str, str] | None:
        """(reason, detail) when `payload`, of `dtype`, is not a whole buffer of this job
        (a step's total streamed to a newcomer), else None."""
        if np.dtype(dtype) != self.dtype:
            return "malformed", f"a total of {dtype}, not {self.dtype.str}"
        return _numbers_fault(payload, self.size, self.dtype)

    def _span(self, index: int) -> int:
        """Elements in bucket `index`."""
        return min(self._per, self.size - index * self._per)

    def forget_before(self, epoch: int, step: int) -> None:
        """Begin operation (`epoch`, `step`): drop buffered buckets of earlier ones."""
        self._at = max(self._at, (epoch, step))
        for op in [op for op in self._inbox if op < self._at]:
            del self._inbox[op]
        for held in (self._sinks, self._placed):
            for key in [key for key in held if key[0] < self._at]:
                del held[key]

    def contribution(self, buf: np.ndarray) -> Contribution:
        """`buf`, which must be of this job's size and dtype, as a contribution with no
        bucket final yet."""
        _check(buf, self.size, self.dtype)
        return Contribution(buf, self._count)

    async def allreduce(self, view: View, step: int, mine: np.ndarray | Contribution) -> np.ndarray:
        """Sum this member's buffer over the members of `view`; every member gets the same
        total, a new array. A plain array counts as final at once; either is read bucket
        by bucket, in descending index order, while the operation runs (and, at a leaf,
        sent as it is: see `Contribution.lent`). A bucket of this member's own that is not
        finite raises `NonFiniteGradient` before it is sent."""
        if isinstance(mine, np.ndarray):
            mine = self.contribution(mine)
            mine.ready_all()
        tree = view.tree()
        parent = tree.parent[self.me]
        children = tree.children(self.me)
        total = self.empty()
        slices = self._slices(total)
        own = self._slices(mine.buf)
        order = range(self._count - 1, -1, -1)
        self.forget_before(view.epoch, step)
        op = (view.epoch, step)

        async def up() -> None:
            for index in order:
                part, mine_part = slices[index], own[index]
                await mine.wait(index)
                if not all_finite(mine_part):
                    raise NonFiniteGradient(
                        f"step {step}: this member's loss or gradient is not finite "
                        "(training diverged, or a sample holds a NaN); the others refuse it"
                    )
                addend = mine_part  # own + first child's into the total, then += the others
                for child in children:
                    data = await self._receive(op, ("up", index, child))
                    received = np.frombuffer(data, dtype=total.dtype)
                    if _same_memory(received, part):  # read into the total: add to it there
                        np.add(part, addend, out=part)
                    else:
                        np.add(addend, received, out=part)
                    addend = part
                if parent is None:
                    if not children:
                        part[:] = mine_part  # a lone member: the total is its own buffer
                    self.down_sent = op
                    self._fan_out(children, view.epoch, step, "down", index, len(slices), part)
                elif children:
                    self._post(parent, view.epoch, step, "up", index, len(slices), part)
                else:  # a leaf: its own bucket as it is, read by the link while it waits
                    mine.lent = True
                    self._post(parent, view.epoch, step, "up", index, len(slices), mine_part)

        async def down() -> None:
            for index in order:
                data = await self._receive(op, ("down", index, parent))
                received = np.frombuffer(data, dtype=total.dtype)
                if not _same_memory(received, slices[index]):  # not read into it: copy
                    slices[index][:] = received
                self._fan_out(children, view.epoch, step, "down", index, len(slices), data)

        sinks: dict[tuple[Op, Bucket], np.ndarray] = {}  # buckets read straight into the total
        for index in order:
            if children:  # the first child's partial sums
                sinks[(op, ("up", index, children[0]))] = slices[index]
            if parent is not None:  # the totals
                sinks[(op, ("down", index, parent))] = slices[index]
        self._sinks.update(sinks)
        downward = None if parent is None else asyncio.ensure_future(down())
        try:  # the way up may stop (a bucket of this member's is not finite): so does down
            await up()
            if downward is not None:
                await downward
        finally:
            if downward is not None:
                downward.cancel()
            for key in sinks:
                self._sinks.pop(key, None)
        return total

    async def broadcast(self, view: View, step: int, buf: np.ndarray | None) -> np.ndarray:
        """Send the root's `buf` down the tree (zeros where a member holds none); returns
        it on every member."""
        tree = view.tree()
        parent = tree.parent[self.me]
        children = tree.children(self.me)
        out = self.zeros() if buf is None else self._own(buf)
        slices = self._slices(out)
        self.forget_before(view.epoch, step)
        for index, part in enumerate(slices):
            if parent is not None:
                data = await self._receive((view.epoch, step), ("down", index, parent))
                part[:] = np.frombuffer(data, dtype=out.dtype)
            self._fan_out(children, view.epoch, step, "down", index, len(slices), part)
        return out

    def empty(self) -> np.ndarray:
        """A new uninitialised buffer of this job's size and dtype, from `alloc`."""
        return self._alloc(self.size, self.dtype)

    def zeros(self) -> np.ndarray:
        """A new buffer of this job's size and dtype, from `alloc`, all zeros."""
        buf = self.empty()
        buf.fill(0)
        return buf

    def _own(self, buf: np.ndarray) -> np.ndarray:
        """A copy of `buf`, which must be of this job's size and dtype."""
        _check(buf, self.size, self.dtype)
        own = self.empty()
        own[:] = buf
        return own

    def _slices(self, flat: np.ndarray) -> list[np.ndarray]:
        return [flat[i * self._per : (i + 1) * self._per] for i in range(self._count)]

    def _post(self, peer, epoch, step, phase, index, count, data) -> None:
        chunk = Chunk(sender=self.me, epoch=epoch, step=step, phase=phase, index=index, count=count)
        payload = (
            data if isinstance(data, bytes) else memoryview(np.ascontiguousarray(data)).cast("B")
        )
        self._send(peer, chunk, payload)

    def _fan_out(self, children, epoch, step, phase, index, count, data) -> None:
        for child in children:
            self._post(child, epoch, step, phase, index, count, data)

    async def _receive(self, op: Op, bucket: Bucket) -> bytes:
        held = self._inbox.get(op, {})
        if bucket in held:
            data = held.pop(bucket)
            if not held:
                del self._inbox[op]
            return data
        future = asyncio.get_running_loop().create_future()
        self._waiting[(op, bucket)] = future
        try:
            return await future
        finally:
            self._waiting.pop((op, bucket), None)


def _where(chunk: Chunk) -> str:
    """The bucket `chunk` carries, in words."""
    return f"bucket {chunk.index} ({chunk.phase}) of epoch {chunk.epoch} step {chunk.step}"


def _same_memory(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether `a` and `b` are the same numbers in memory (start and length)."""
    return a.nbytes == b.nbytes and a.ctypes.data == b.ctypes.data


def _check(buf: np.ndarray, size: int, dtype: np.dtype) -> None:
    if buf.shape != (size,) or buf.dtype != dtype:
        raise ValueError(f"buffer {buf.shape} {buf.dtype}, not ({size},) {dtype}")


def _numbers_fault(payload: bytes, elements: int, dtype: np.dtype) -> tuple[str, str] | None:
    """(reason, detail) when `payload` is not `elements` finite numbers of `dtype`."""
    if len(payload) != elements * dtype.itemsize:
        return "malformed", f"{len(payload)} bytes, not {elements * dtype.itemsize}"
    if not all_finite(np.frombuffer(payload, dtype)):
        return "nonfinite", "not finite"
    return None


def all_finite(numbers: np.ndarray) -> bool:
    """Whether `numbers` holds no NaN and no infinity. One of either makes the numbers' dot
    product with themselves one (squares are never negative: no two infinities cancel),
    and BLAS reads the numbers once, writing nothing: about twice as fast as numpy's
    pairwise `sum`, on which these checks spent 6 % of a 10M mlp step's CPU. Only a
    product that is not finite (those, or finite numbers whose squares overflow) is looked
    at number by number."""
    with np.errstate(over="ignore", invalid="ignore"):  # what the product may meet
        return bool(np.isfinite(np.dot(numbers, numbers)) or np.isfinite(numbers).all())
