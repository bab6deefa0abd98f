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
"""

from __future__ import annotations

import numpy as np
import torch

from chaos_worker.collective import Alloc


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
