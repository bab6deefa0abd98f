"""Tree all-reduce over the overlay: partial sums flow up to the root, totals flow down.

The flat buffer is cut into buckets; a member forwards bucket `i` as soon as it holds
bucket `i` from every child, and the root starts sending totals of bucket `i` down before
later buckets have arrived, so a large model streams through the tree instead of waiting
for the whole gradient at every hop. Cancelling the awaiting task aborts the operation.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

import numpy as np

from chaos_worker.membership.view import View
from chaos_worker.net.wire import Chunk

Key = tuple[int, int, str, int, str]  # epoch, step, phase, bucket index, sender
Send = Callable[[str, Chunk, bytes | memoryview], bool]


class TreeAllReduce:
    """All-reduce (sum) of a flat numpy buffer over the tree of a view."""

    def __init__(self, me: str, send: Send, *, bucket_bytes: int = 4 << 20) -> None:
        self.me = me
        self._send = send
        self.bucket_bytes = bucket_bytes
        self._inbox: dict[Key, bytes] = {}
        self._waiting: dict[Key, asyncio.Future] = {}
        self.down_sent: tuple[int, int] | None = None
        """(epoch, step) of the last all-reduce whose totals this member, as root, began
        to send down: anything it sends before that precedes the totals on every path."""

    def deliver(self, sender: str, chunk: Chunk, payload: bytes) -> None:
        """Hand over a bucket received from `sender` (may arrive before it is awaited)."""
        key = (chunk.epoch, chunk.step, chunk.phase, chunk.index, sender)
        future = self._waiting.pop(key, None)
        if future is not None and not future.done():
            future.set_result(payload)
        else:
            self._inbox[key] = payload

    def forget_before(self, epoch: int, step: int) -> None:
        """Drop buffered buckets of earlier operations."""
        for key in [k for k in self._inbox if (k[0], k[1]) < (epoch, step)]:
            del self._inbox[key]

    async def allreduce(self, view: View, step: int, buf: np.ndarray) -> np.ndarray:
        """Sum `buf` over the members of `view`; every member gets the same total."""
        tree = view.tree()
        parent = tree.parent[self.me]
        children = tree.children(self.me)
        total = buf.copy()
        slices = self._slices(total)
        self.forget_before(view.epoch, step)

        async def up() -> None:
            for index, part in enumerate(slices):
                for child in children:
                    data = await self._receive((view.epoch, step, "up", index, child))
                    part += np.frombuffer(data, dtype=total.dtype)
                if parent is None:
                    self.down_sent = (view.epoch, step)
                    self._fan_out(children, view.epoch, step, "down", index, len(slices), part)
                else:
                    self._post(parent, view.epoch, step, "up", index, len(slices), part)

        async def down() -> None:
            for index, part in enumerate(slices):
                data = await self._receive((view.epoch, step, "down", index, parent))
                part[:] = np.frombuffer(data, dtype=total.dtype)
                self._fan_out(children, view.epoch, step, "down", index, len(slices), data)

        if parent is None:
            await up()
        else:
            await asyncio.gather(up(), down())
        return total

    async def broadcast(self, view: View, step: int, buf: np.ndarray | None, like: np.ndarray):
        """Send the root's `buf` down the tree; returns it on every member."""
        tree = view.tree()
        parent = tree.parent[self.me]
        children = tree.children(self.me)
        out = like.copy() if buf is None else buf.copy()
        slices = self._slices(out)
        for index, part in enumerate(slices):
            if parent is not None:
                data = await self._receive((view.epoch, step, "down", index, parent))
                part[:] = np.frombuffer(data, dtype=out.dtype)
            self._fan_out(children, view.epoch, step, "down", index, len(slices), part)
        return out

    def _slices(self, flat: np.ndarray) -> list[np.ndarray]:
        per = max(1, self.bucket_bytes // flat.itemsize)
        count = max(1, math.ceil(flat.size / per))
        return [flat[i * per : (i + 1) * per] for i in range(count)]

    def _post(self, peer, epoch, step, phase, index, count, data) -> None:
        chunk = Chunk(sender=self.me, epoch=epoch, step=step, phase=phase, index=index, count=count)
        payload = (
            data if isinstance(data, bytes) else memoryview(np.ascontiguousarray(data)).cast("B")
        )
        self._send(peer, chunk, payload)

    def _fan_out(self, children, epoch, step, phase, index, count, data) -> None:
        for child in children:
            self._post(child, epoch, step, phase, index, count, data)

    async def _receive(self, key: Key) -> bytes:
        if key in self._inbox:
            return self._inbox.pop(key)
        future = asyncio.get_running_loop().create_future()
        self._waiting[key] = future
        try:
            return await future
        finally:
            self._waiting.pop(key, None)
