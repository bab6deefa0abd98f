"""Gradient buckets from a hostile peer, over real TCP, into a real tree all-reduce.

The receiver is a root `w0` whose child in the view is `w1`; the attacker connects and
says it is `w1` (nothing authenticates a peer yet), so its buckets are keyed as the
child's. A bucket that is short, odd-length, of another count, not finite or for an
operation nobody expects is refused and counted; the all-reduce goes on waiting for a
valid one and completes with the right sum.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np
import pytest
from chaos_worker.collective import MAX_AHEAD_OPS, TreeAllReduce
from chaos_worker.membership.rules import expected
from chaos_worker.membership.view import View
from chaos_worker.net.bounds import Guard, Limits, Rejections
from chaos_worker.net.transport import TcpTransport
from chaos_worker.net.wire import Chunk, Hello
from chaos_worker.telemetry.metrics import WorkerMetrics

from tests.security.kit import frame
from tests.transportkit import until

pytestmark = pytest.mark.security

SIZE = 10
BUCKET = 32  # bytes: buckets of 4, 4 and 2 float64
SPANS = (4, 4, 2)
EPOCH, STEP = 1, 5
VIEW = View(
    epoch=EPOCH,
    members={"w0": "127.0.0.1:1", "w1": "127.0.0.1:2"},
    speeds={"w0": 1.0, "w1": 1.0},
    overlay={"w0|w1": 1.0},
    root="w0",
    parent={"w0": None, "w1": "w0"},
)


@dataclass
class Reducer:
    transport: TcpTransport
    collective: TreeAllReduce
    metrics: WorkerMetrics
    port: int
    blamed: list[str]
    """Senders `on_bad` heard of: the member takes each for crashed and redoes the step."""

    def rejected(self, reason: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "chaos_rejected_messages_total", {"reason": reason}
        )
        return value or 0.0

    def refused(self) -> float:
        return sum(self.rejected(r) for r in ("malformed", "nonfinite", "unexpected", "stale"))


async def _member(*, expects_everything: bool = False, me: str = "w0") -> Reducer:
    """A member `me` of `VIEW` (the root `w0`, or its child `w1`) on a real transport; it
    reads buckets straight into its result (`place`), as a `Member` has it do: a child its
    totals, the root its child's partial sums."""
    metrics = WorkerMetrics(me)
    rejections = Rejections(metrics.observe_rejected)
    box: list[TreeAllReduce] = []
    blamed: list[str] = []

    def on_message(sender: str, message, payload: bytes) -> None:
        if isinstance(message, Chunk):
            box[0].deliver(sender, message, payload)

    limits = Limits(chunk_bytes=BUCKET)
    transport = TcpTransport(me, on_message, lambda *_: None, max_payload=limits.largest)
    transport.guard = Guard(limits, rejections)

    def expects(sender: str, epoch: int, step: int) -> bool:
        return expects_everything or expected(VIEW, [], STEP, sender, (epoch, step))

    collective = TreeAllReduce(
        me,
        transport.send,
        size=SIZE,
        dtype=np.float64,
        bucket_bytes=BUCKET,
        expects=expects,
        reject=rejections,
        on_bad=blamed.append,
    )
    box.append(collective)
    transport.place = collective.place
    port = await transport.listen("127.0.0.1", 0)
    return Reducer(transport, collective, metrics, port, blamed)


def _placed(member: Reducer) -> list[int]:
    """The buckets `member` reads straight into its result (`place`), by index, as they
    come."""
    placed: list[int] = []
    place = member.collective.place

    def counting(sender: str, chunk: Chunk, nbytes: int) -> memoryview | None:
        where = place(sender, chunk, nbytes)
        if where is not None:
            placed.append(chunk.index)
        return where

    member.transport.place = counting
    return placed


def _chunk(
    index: int, *, epoch: int = EPOCH, step: int = STEP, count: int = 3, sender: str = "w1"
) -> Chunk:
    phase = "up" if sender == "w1" else "down"
    return Chunk(sender=sender, epoch=epoch, step=step, phase=phase, index=index, count=count)


def _bucket(index: int, value: float = 2.0) -> bytes:
    return np.full(SPANS[index], value, dtype=np.float64).tobytes()


async def _as_w1(root: Reducer, name: str = "w1") -> asyncio.StreamWriter:
    """A raw connection to the root that says it is its child `w1` (or another `name`)."""
    _, writer = await asyncio.open_connection("127.0.0.1", root.port)
    writer.write(frame(Hello(sender=name)))
    return writer


def test_bad_buckets_are_refused_and_the_step_completes_with_the_valid_ones() -> None:
    async def scenario() -> None:
        root = await _member()
        mine = np.arange(SIZE, dtype=np.float64)
        reduce = asyncio.ensure_future(root.collective.allreduce(VIEW, STEP, mine))
        writer = await _as_w1(root)
        nan = np.full(4, 1.0)
        nan[2] = np.nan
        inf = np.full(4, np.inf)
        bad = [
            (_chunk(0), b"\x00" * 7),  # the 7-byte chunk that killed the root
            (_chunk(0), b"\x00" * 12),  # odd length: a bucket and a half of float64
            (_chunk(2), _bucket(0)),  # the last bucket holds 2, not 4
            (_chunk(0, count=2), _bucket(0)),  # another buffer's cut
            (_chunk(0), nan.tobytes()),
            (_chunk(1), inf.tobytes()),
        ]
        for chunk, payload in bad:
            writer.write(frame(chunk, payload))
        await writer.drain()
        await until(lambda: root.refused() == len(bad), "every bad bucket refused")
        for index in range(3):
            writer.write(frame(_chunk(index), _bucket(index)))
        await writer.drain()
        total = await asyncio.wait_for(reduce, 30)
        np.testing.assert_array_equal(total, mine + 2.0)
        assert root.rejected("malformed") == 4
        assert root.rejected("nonfinite") == 2
        assert root.collective.held == 0
        # each unusable bucket of the step in progress blames its sender, and only it
        assert root.blamed == ["w1"] * len(bad)
        writer.close()
        await root.transport.close()

    asyncio.run(scenario())


def test_a_child_reads_totals_into_its_result_and_a_bad_one_is_overwritten() -> None:
    """Below the root, a total is read straight into the slice of the result it ends in
    (`TreeAllReduce.place`), once per bucket: a NaN read there is refused and blamed as any
    bucket is, the valid one after it (read to a buffer of its own) is copied over it, and
    the result is the sum. The child handed its own buckets to the link to the root as they
    were: its contribution says so (`lent`), so the trainer gives that buffer up if the
    step aborts."""

    async def scenario() -> None:
        child = await _member(me="w1")
        placed = _placed(child)
        mine = child.collective.contribution(np.arange(SIZE, dtype=np.float64))
        mine.ready_all()
        reduce = asyncio.ensure_future(child.collective.allreduce(VIEW, STEP, mine))
        writer = await _as_w1(child, "w0")
        nan = np.full(2, np.nan).tobytes()
        writer.write(frame(_chunk(2, sender="w0"), nan))
        for index in (2, 1, 0):
            writer.write(frame(_chunk(index, sender="w0"), _bucket(index, 7.0)))
        await writer.drain()
        total = await asyncio.wait_for(reduce, 30)
        np.testing.assert_array_equal(total, np.full(SIZE, 7.0))
        assert placed == [2, 1, 0]  # the NaN took bucket 2's place; its valid one did not
        assert child.rejected("nonfinite") == 1
        assert child.blamed == ["w0"]
        assert mine.lent
        writer.close()
        await child.transport.close()

    asyncio.run(scenario())


def test_a_second_copy_is_refused_while_the_first_is_read_into_the_result() -> None:
    """A hostile parent starts a total on one connection (read straight into the result)
    and sends another copy of it, NaN, whole, on a second: taking that copy would let the
    first frame go on writing the result after it was checked. The copy is refused; the
    first, once finished, is checked and used."""

    async def scenario() -> None:
        child = await _member(me="w1")
        mine = np.zeros(SIZE, dtype=np.float64)
        reduce = asyncio.ensure_future(child.collective.allreduce(VIEW, STEP, mine))
        first = await _as_w1(child, "w0")
        for index in (1, 0):
            first.write(frame(_chunk(index, sender="w0"), _bucket(index, 3.0)))
        whole = frame(_chunk(2, sender="w0"), _bucket(2, 5.0))
        first.write(whole[:-8])  # all but the last number of bucket 2
        await first.drain()
        second = await _as_w1(child, "w0")
        second.write(frame(_chunk(2, sender="w0"), np.full(2, np.nan).tobytes()))
        await second.drain()
        await until(lambda: child.rejected("unexpected") == 1, "the second copy refused")
        assert not reduce.done()
        first.write(whole[-8:])
        await first.drain()
        total = await asyncio.wait_for(reduce, 30)
        np.testing.assert_array_equal(total, [3.0] * 8 + [5.0] * 2)
        assert child.rejected("nonfinite") == 0  # the NaN was never read as a bucket
        first.close()
        second.close()
        await child.transport.close()

    asyncio.run(scenario())


def test_the_root_lends_nothing_and_adds_its_own_where_its_childs_sums_were_read() -> None:
    """The root sends totals it computed, never its own buffer. Its child's partial sums
    are read straight into the result (`place`), once per bucket, and the root adds its
    own there: a NaN read into a bucket's place is refused and blamed, and the valid copy
    after it (read to a buffer of its own) replaces it in the sum."""

    async def scenario() -> None:
        root = await _member()
        placed = _placed(root)
        mine = root.collective.contribution(np.arange(SIZE, dtype=np.float64))
        mine.ready_all()
        reduce = asyncio.ensure_future(root.collective.allreduce(VIEW, STEP, mine))
        writer = await _as_w1(root)
        writer.write(frame(_chunk(2), np.full(2, np.nan).tobytes()))
        for index in (2, 1, 0):
            writer.write(frame(_chunk(index), _bucket(index)))
        await writer.drain()
        total = await asyncio.wait_for(reduce, 30)
        np.testing.assert_array_equal(total, np.arange(SIZE) + 2.0)
        assert placed == [2, 1, 0]  # the NaN took bucket 2's place; its valid one did not
        assert root.rejected("nonfinite") == 1
        assert root.blamed == ["w1"]
        assert not mine.lent
        writer.close()
        await root.transport.close()

    asyncio.run(scenario())


def test_buckets_nobody_expects_are_not_held() -> None:
    """Buckets far ahead (a later epoch, a step far on) or from a sender in no known view
    are refused, never buffered; the next step's are held, as a fast child sends them."""

    async def scenario() -> None:
        root = await _member()
        writer = await _as_w1(root)
        far = [
            _chunk(0, epoch=EPOCH + 1),
            _chunk(0, epoch=1_000_000),
            _chunk(0, step=STEP + 2),
            _chunk(0, step=10**15),
        ]
        for chunk in far:
            writer.write(frame(chunk, _bucket(0)))
        writer.write(frame(_chunk(0, step=STEP + 1), _bucket(0)))
        await writer.drain()
        _, stranger = await asyncio.open_connection("127.0.0.1", root.port)
        stranger.write(frame(Hello(sender="w7")) + frame(_chunk(0), _bucket(0)))
        await stranger.drain()
        await until(lambda: root.rejected("unexpected") == len(far) + 1, "refusals")
        await until(lambda: root.collective.held == 1, "the next step's bucket held")
        assert root.blamed == []  # not the step in progress: nothing to redo
        writer.close()
        stranger.close()
        await root.transport.close()

    asyncio.run(scenario())


def test_at_most_max_ahead_ops_operations_are_held() -> None:
    """Even where every operation would be expected (a member far behind, about to be
    admitted again), buckets of at most `MAX_AHEAD_OPS` operations ahead are held."""

    async def scenario() -> None:
        root = await _member(expects_everything=True)
        writer = await _as_w1(root)
        sent = 3 * MAX_AHEAD_OPS
        for step in range(STEP + 1, STEP + 1 + sent):
            writer.write(frame(_chunk(0, step=step), _bucket(0)))
        await writer.drain()
        refused = sent - MAX_AHEAD_OPS
        await until(lambda: root.rejected("unexpected") == refused, "the refusals")
        assert root.collective.held == MAX_AHEAD_OPS
        writer.close()
        await root.transport.close()

    asyncio.run(scenario())


def test_a_bucket_over_the_bucket_size_is_refused_at_the_transport() -> None:
    async def scenario() -> None:
        root = await _member()
        writer = await _as_w1(root)
        writer.write(frame(_chunk(0), bytes(BUCKET + 8)))
        writer.write(frame(_chunk(0, step=STEP + 1), _bucket(0)))
        await writer.drain()
        await until(lambda: root.collective.held == 1, "the valid bucket after it")
        assert root.rejected("oversize") == 1
        writer.close()
        await root.transport.close()

    asyncio.run(scenario())


def test_a_total_streamed_to_a_newcomer_is_checked_as_a_bucket_is() -> None:
    """What `Newcomer.on_total` refuses: another dtype, another length, a NaN."""

    async def scenario() -> None:
        root = await _member()
        good = np.ones(SIZE, dtype=np.float64)
        nan = good.copy()
        nan[-1] = np.nan
        assert root.collective.check_total("<f8", good.tobytes()) is None
        assert root.collective.check_total("<f4", good.astype(np.float32).tobytes())[0] == (
            "malformed"
        )
        assert root.collective.check_total("<f8", good.tobytes()[:-1])[0] == "malformed"
        assert root.collective.check_total("<f8", nan.tobytes())[0] == "nonfinite"
        await root.transport.close()

    asyncio.run(scenario())
