"""Buckets released to the all-reduce while backward still runs, as DDP's reducer does.

Earlier micro-batches only accumulate. Around the last micro-batch's backward
(`gradient_sum`'s `last_backward`) every trainable parameter gets a
`register_post_accumulate_grad_hook`; once every parameter whose flat range overlaps a
bucket has had its gradient accumulated, the bucket is final and is released
(`Contribution.ready`, handed to the event loop with `call_soon_threadsafe`). The bucket
that holds the loss and the sample count also waits for those, written as the last
forward is done. When the compute returns, `finish` releases what no hook did: buckets of
parameters that got no gradient in the last micro-batch, or all of them without samples.
The hooks are removed as the backward ends, so none outlives a step.

On a GPU a hook fires when the accumulating kernel is queued, not done: there the signal
starts the bucket's copy to the host (`staging.BucketCopies`), and the compute thread,
once it has queued the step (`Release.computed`), releases each bucket as its copy lands.

Only with `FlatGradients` and more than one bucket (`sync.GradientSync` decides): with
mixed dtypes the buffer is only filled after the compute; a single bucket is final only
when backward ends. There the whole buffer is released after the compute.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from chaos_worker.collective import Contribution

Signal = Callable[[int], None]
"""Release bucket `i`: called on the compute thread, once per bucket and step."""


class BucketMap:
    """Which buckets each trainable parameter's gradient, and the loss and sample count
    after them, lie in; built once for a trainer."""

    def __init__(
        self, params: Sequence[torch.Tensor], *, bucket_elements: int, buckets: int
    ) -> None:
        self.params = list(params)
        spans: list[range] = []
        offset = 0
        for p in self.params:
            spans.append(_span(offset, p.numel(), bucket_elements))
            offset += p.numel()
        spans.append(_span(offset, 2, bucket_elements))  # the loss and the sample count
        if spans[-1].stop != buckets:
            raise ValueError(f"{offset + 2} elements make {spans[-1].stop} buckets, not {buckets}")
        self.spans = spans
        """Per parameter, then for the loss and count (the last entry), its buckets."""
        self.needs = [0] * buckets
        """Per bucket, how many of `spans` it waits for."""
        for span in spans:
            for bucket in span:
                self.needs[bucket] += 1

    def step(
        self,
        buf: np.ndarray,
        samples: int,
        signal: Signal,
        settle: Callable[[], None] | None = None,
    ) -> Release:
        """The release of one step's buckets of `buf`, `samples` computed here; `settle`:
        see `Release.computed`."""
        return Release(self, buf, samples, signal, settle)


class Release:
    """One step: releases each bucket once, when the last of what it waits for is final."""

    def __init__(
        self,
        buckets: BucketMap,
        buf: np.ndarray,
        samples: int,
        signal: Signal,
        settle: Callable[[], None] | None = None,
    ) -> None:
        self._map = buckets
        self._buf = buf
        self._samples = samples
        self._signal = signal
        self._settle = settle
        self._pending = list(buckets.needs)
        self._final: set[int] = set()  # indices into the map's spans
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def last_backward(self, loss: float) -> Iterator[None]:
        """Around the last micro-batch's backward, on the compute thread: writes the loss
        and the sample count, and hooks every parameter until the backward ends."""
        self._tail(loss)
        handles = [
            p.register_post_accumulate_grad_hook(functools.partial(self._accumulated, k))
            for k, p in enumerate(self._map.params)
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def computed(self, loss: float) -> None:
        """On the compute thread, as it returns. Where `signal` only starts work whose end
        `settle` waits for (a bucket's copy from a device), it releases the rest and calls
        `settle`, so the event loop never waits for a device; elsewhere nothing (`finish`,
        on the loop, releases the rest)."""
        if self._settle is not None:
            self.finish(loss)
            self._settle()

    def finish(self, loss: float) -> None:
        """The compute returned: release every bucket not released yet."""
        self._tail(loss)
        self._final_many(range(len(self._map.spans)))

    def _tail(self, loss: float) -> None:
        self._buf[-2] = loss
        self._buf[-1] = self._samples
        self._final_many([len(self._map.params)])

    def _accumulated(self, k: int, _param: torch.Tensor) -> None:
        self._final_many([k])

    def _final_many(self, ks: Sequence[int]) -> None:
        ready = []
        with self._lock:
            for k in ks:
                if k in self._final:
                    continue  # a hook that fires twice, or what the compute finished
                self._final.add(k)
                for bucket in self._map.spans[k]:
                    self._pending[bucket] -= 1
                    if self._pending[bucket] == 0:
                        ready.append(bucket)
        for bucket in ready:
            self._signal(bucket)


def signal_to(loop: asyncio.AbstractEventLoop, contribution: Contribution) -> Signal:
    """A `Signal` that marks the bucket ready on `loop`'s thread."""

    def signal(index: int) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: its operation is over
            loop.call_soon_threadsafe(contribution.ready, index)

    return signal


def _span(offset: int, count: int, per: int) -> range:
    """Buckets of `per` elements that elements [offset, offset + count) overlap."""
    return range(offset // per, (offset + count - 1) // per + 1) if count else range(0)
