"""Host buffers a step's data passes through: page-locked (pinned) when the model is on a GPU.

A GPU reads and writes page-locked host memory directly (DMA). Pageable memory, such as
a plain numpy array, the driver first copies through a small page-locked buffer of its
own, so a copy between it and the device runs at a fraction of the bus's speed. Every step
of a job on a GPU copies its flat gradient to the host (the contribution every member
all-reduces) and the reduced total back, so both live in pinned memory there.

Pinned buffers come from torch's caching host allocator: a freed one is kept and handed out
again, so a total allocated every step costs no page-locking after the first. That
allocator rounds each block up to a power of two, so a job holds up to twice the
page-locked memory its buffers need: the contribution, the total being formed, the last
one applied, and any still queued to a newcomer. On a CPU a buffer is a plain numpy array.

Where the gradient spans several buckets, it reaches the contribution bucket by bucket
while backward runs (`BucketStaging`), copied on a side stream, so the all-reduce of the
last layers' buckets overlaps the backward of the first ones, as it does on a CPU.
"""

from __future__ import annotations

import collections
import threading

import numpy as np
import torch

from chaos_worker.collective import Alloc
from chaos_worker.training.overlap import Signal


def host_alloc(device: torch.device) -> Alloc:
    """How the host buffers of a job on `device` are allocated (uninitialised)."""
    if device.type != "cuda":
        return np.empty
    return pinned_empty


def pinned_empty(size: int, dtype: np.dtype | type) -> np.ndarray:
    """An uninitialised numpy array of `size` elements of `dtype` in page-locked memory;
    the array keeps its memory alive (CUDA must be available)."""
    like = torch.from_numpy(np.empty(0, dtype))
    return torch.empty(size, dtype=like.dtype, pin_memory=True).numpy()


class BucketStaging:
    """Copies a device's flat gradient to the host bucket by bucket while backward runs,
    on a side stream, as DDP's reducer overlaps its buckets' communication with backward.

    A gradient hook fires when its accumulating kernel is queued, not when it is done, so a
    bucket final to the hooks (`overlap.Release`) is not final on the device yet. Each
    step's `BucketCopies` turns that release into a copy on this side stream, ordered after
    the work queued so far on the stream the hook runs on, and releases the bucket to the
    all-reduce only once its copy has completed (`BucketCopies.drain`). On a device that is
    not CUDA the copy is a plain blocking one, in the hook.
    """

    def __init__(self, device: torch.device, bucket_elements: int) -> None:
        self._per = bucket_elements
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def step(self, flat: torch.Tensor, host: np.ndarray, signal: Signal) -> BucketCopies:
        """One step's copies from `flat` (the device's gradients) into the first elements
        of `host` (the contribution), each bucket released through `signal` once copied."""
        return BucketCopies(flat, host, self._per, self._stream, signal)


class BucketCopies:
    """One step of `BucketStaging`: a `Signal` that starts a bucket's copy, and `drain`,
    which releases the copied buckets as their copies complete."""

    def __init__(
        self,
        flat: torch.Tensor,
        host: np.ndarray,
        per: int,
        stream: torch.cuda.Stream | None,
        signal: Signal,
    ) -> None:
        if flat.dim() != 1 or flat.numel() > host.size:
            raise ValueError(f"{list(flat.shape)} elements do not fit a buffer of {host.size}")
        self._flat = flat
        self._host = torch.from_numpy(host[: flat.numel()])
        self._per = per
        self._stream = stream
        self._signal = signal
        self._copying: collections.deque[tuple[int, torch.cuda.Event | None]] = collections.deque()
        self._lock = threading.Lock()

    def __call__(self, index: int) -> None:
        """Bucket `index` is final to the hooks: start its copy (gradient elements only;
        the loss and the sample count are written on the host)."""
        start = index * self._per
        stop = min(start + self._per, self._flat.numel())
        done = None
        if start < stop and self._stream is None:
            self._host[start:stop].copy_(self._flat[start:stop])
        elif start < stop:
            self._stream.wait_stream(torch.cuda.current_stream(self._flat.device))
            with torch.cuda.stream(self._stream):
                self._host[start:stop].copy_(self._flat[start:stop], non_blocking=True)
                done = torch.cuda.Event()
                done.record(self._stream)
        with self._lock:
            self._copying.append((index, done))

    def drain(self) -> None:
        """On the compute thread, once it has queued the step's work: release every bucket
        whose copy started, in the order they started, each as its copy completes."""
        while True:
            with self._lock:
                if not self._copying:
                    return
                index, done = self._copying.popleft()
            if done is not None:
                done.synchronize()
            self._signal(index)
