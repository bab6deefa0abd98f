"""The tree all-reduce fed bucket by bucket (`Contribution`), as backward releases them.

Four members in a tree of depth two (w0 the root, w1 and w2 its children, w3 under w1)
over real transports: TCP on loopback (the cluster tier) and the in-memory loop network
(unit). Every buffer starts as NaN and a bucket gets its values only just before it is
released, in an order of its own per member: the operation must read a bucket only once
it is released, and the totals must be bit-identical to those of whole buffers.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
from chaos_worker.collective import Contribution, NonFiniteGradient, TreeAllReduce
from chaos_worker.membership.view import View
from chaos_worker.net.bounds import Guard, Limits
from chaos_worker.net.loop import LoopNetwork
from chaos_worker.net.transport import TcpTransport, Transport, TransportFactory
from chaos_worker.net.wire import Chunk

SIZE = 21
BUCKET = 32  # bytes: five buckets of 4 float64 and one of 1
COUNT = 6
PARENT = {"w0": None, "w1": "w0", "w2": "w0", "w3": "w1"}


@pytest.fixture(
    params=[
        pytest.param(lambda: TcpTransport, id="tcp", marks=pytest.mark.cluster),
        pytest.param(lambda: LoopNetwork().factory(), id="loop", marks=pytest.mark.unit),
    ]
)
def new_factory(request: pytest.FixtureRequest) -> Callable[[], TransportFactory]:
    """Makes the factory inside the test's own event loop (a loop network is per loop)."""
    return request.param


@dataclass
class Member:
    name: str
    transport: Transport
    collective: TreeAllReduce
    sent: list[tuple[str, str, int]] = field(default_factory=list)
    """(peer, phase, bucket) of every chunk this member sent, in order."""


async def _members(factory: TransportFactory) -> tuple[dict[str, Member], View]:
    members: dict[str, Member] = {}
    addresses = {}
    for name in PARENT:

        def on_message(sender: str, message, payload: bytes, name: str = name) -> None:
            if isinstance(message, Chunk):
                members[name].collective.deliver(sender, message, payload)

        transport = factory(name, on_message, lambda *_: None, max_payload=BUCKET)
        transport.guard = Guard(Limits(chunk_bytes=BUCKET))
        addresses[name] = f"127.0.0.1:{await transport.listen('127.0.0.1', 0)}"
        sent: list[tuple[str, str, int]] = []

        def send(peer: str, chunk: Chunk, payload, transport=transport, sent=sent) -> bool:
            sent.append((peer, chunk.phase, chunk.index))
            return transport.send(peer, chunk, payload)

        collective = TreeAllReduce(name, send, size=SIZE, dtype=np.float64, bucket_bytes=BUCKET)
        members[name] = Member(name, transport, collective, sent)
    for name, parent in PARENT.items():
        if parent is not None:
            members[name].transport.connect(parent, addresses[parent])
            members[parent].transport.connect(name, addresses[name])
    view = View(
        epoch=1,
        members=addresses,
        speeds=dict.fromkeys(PARENT, 1.0),
        overlay={f"{p}|{c}": 1.0 for c, p in PARENT.items() if p is not None},
        root="w0",
        parent=PARENT,
    )
    return members, view


def _buffers(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(SIZE) * 10.0 ** rng.integers(-8, 8) for name in PARENT}


def _release(
    collective: TreeAllReduce, values: np.ndarray, seed: int
) -> tuple[Contribution, asyncio.Task]:
    """A contribution of `values` whose buffer holds NaN until each bucket is released,
    one at a time, in a random order, with the event loop turning between them."""
    contribution = collective.contribution(np.full(SIZE, np.nan))
    per = collective.bucket_elements

    async def backward() -> None:
        order = list(range(collective.buckets))
        random.Random(seed).shuffle(order)
        for index in order:
            await asyncio.sleep(0.002)
            span = slice(index * per, (index + 1) * per)
            contribution.buf[span] = values[span]
            contribution.ready(index)

    return contribution, asyncio.ensure_future(backward())


def test_released_buckets_give_the_totals_of_whole_buffers_bit_for_bit(new_factory) -> None:
    async def scenario() -> None:
        members, view = await _members(new_factory())
        assert {m.collective.buckets for m in members.values()} == {COUNT}
        for seed in range(3):
            mine = _buffers(seed)
            whole = await asyncio.gather(
                *(m.collective.allreduce(view, 2 * seed, mine[n]) for n, m in members.items())
            )
            for m in members.values():
                m.sent.clear()
            releases = [
                _release(m.collective, mine[n], seed + i)
                for i, (n, m) in enumerate(members.items())
            ]
            released = await asyncio.gather(
                *(
                    m.collective.allreduce(view, 2 * seed + 1, contribution)
                    for m, (contribution, _) in zip(members.values(), releases, strict=True)
                )
            )
            for total in whole + released:
                np.testing.assert_array_equal(total, whole[0])
            assert not np.array_equal(whole[0], sum(mine.values()))  # order of sums matters
            descending = list(range(COUNT - 1, -1, -1))
            for name, m in members.items():
                for peer in [PARENT[name], *(c for c, p in PARENT.items() if p == name)]:
                    sent = [index for to, _, index in m.sent if to == peer]
                    assert sent == (descending if peer is not None else []), (name, peer)
        for m in members.values():
            assert m.collective.held == 0
            await m.transport.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("where", [0, SIZE - 2, SIZE - 1])  # a gradient, the loss, the count
def test_a_bucket_not_finite_raises_before_anything_of_it_is_sent(new_factory, where) -> None:
    async def scenario() -> None:
        members, view = await _members(new_factory())
        leaf = members["w3"]
        mine = np.ones(SIZE)
        mine[where] = np.nan
        up = asyncio.ensure_future(members["w1"].collective.allreduce(view, 0, np.ones(SIZE)))
        with pytest.raises(NonFiniteGradient, match="step 0: this member's loss or gradient"):
            await leaf.collective.allreduce(view, 0, mine)
        bad = where // leaf.collective.bucket_elements
        assert [index for _, _, index in leaf.sent] == list(range(COUNT - 1, bad, -1))
        await asyncio.sleep(0.05)
        assert not up.done()  # w1 still waits for bucket `bad`, which never left w3
        up.cancel()
        for m in members.values():
            await m.transport.close()

    asyncio.run(scenario())


def test_releases_after_an_operation_is_cancelled_change_nothing(new_factory) -> None:
    async def scenario() -> None:
        members, view = await _members(new_factory())
        root = members["w0"]
        contribution = root.collective.contribution(np.ones(SIZE))
        op = asyncio.ensure_future(root.collective.allreduce(view, 0, contribution))
        contribution.ready(COUNT - 1)
        await asyncio.sleep(0.01)
        op.cancel()
        with pytest.raises(asyncio.CancelledError):
            await op
        contribution.ready_all()  # what an aborted step's backward still signals
        contribution.ready(COUNT - 1)
        await asyncio.sleep(0.01)
        assert root.sent == []  # the root waited for its children: nothing went down
        for m in members.values():
            await m.transport.close()

    asyncio.run(scenario())
