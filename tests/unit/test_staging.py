"""Where a step's host buffers come from (`training/staging.py`): the collective's allocator
makes every contribution and total, so a job on a GPU stages through pinned memory.

The allocator is real numpy and torch; the GPU test runs only where CUDA is
(`scripts/gpu-check.sh` runs this file on the device).
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from chaos_worker.collective import TreeAllReduce
from chaos_worker.config import WorkerConfig
from chaos_worker.examples.digits import PairDataset
from chaos_worker.membership.view import View
from chaos_worker.training.compute import local_step
from chaos_worker.training.staging import host_alloc, pinned_empty
from chaos_worker.training.sync import GradientSync, gradient_layout
from chaos_worker.training.trainspec import TrainSpec
from torch import nn

pytestmark = pytest.mark.unit

BATCH = 16
ALONE = View(
    epoch=1,
    members={"w0": "127.0.0.1:1"},
    speeds={"w0": 1.0},
    overlay={},
    root="w0",
    parent={"w0": None},
)


def _spec(device: torch.device) -> TrainSpec:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 3)).double().to(device)
    data = PairDataset(torch.randn(64, 6, dtype=torch.float64), torch.arange(64) % 3)
    return TrainSpec(model, torch.optim.AdamW(model.parameters(), lr=0.01), data)


def _config() -> WorkerConfig:
    return WorkerConfig(
        id="w0",
        listen="127.0.0.1:0",
        entry="x:y",
        global_batch=BATCH,
        members={"w0": "127.0.0.1:1"},
        dtype="float64",
    )


class Recording:
    """An allocator that hands out plain arrays and remembers each one."""

    def __init__(self) -> None:
        self.handed: list[np.ndarray] = []

    def __call__(self, size: int, dtype: np.dtype) -> np.ndarray:
        self.handed.append(np.empty(size, dtype))
        return self.handed[-1]

    def made(self, array: np.ndarray) -> bool:
        return any(array is handed for handed in self.handed)


def _step(sync: GradientSync, collective: TreeAllReduce, step: int) -> tuple[float, np.ndarray]:
    """One step of a job of one member, through the collective: (mean loss, total)."""
    ids = sync.sample_ids(step)

    async def reduce() -> np.ndarray:
        contribution = collective.contribution(sync.buf)
        release = sync.start(contribution, len(ids))
        operation = asyncio.ensure_future(collective.allreduce(ALONE, step, contribution))
        loss = await asyncio.to_thread(sync.compute, ids, release)
        sync.stage(contribution, release, loss, len(ids))
        return await operation

    total = asyncio.run(reduce())
    return sync.update(total, lambda: None), total


def test_on_a_cpu_buffers_are_plain_numpy() -> None:
    assert host_alloc(torch.device("cpu")) is np.empty


def test_contributions_and_totals_come_from_the_collectives_allocator() -> None:
    """The sync's buffer (and a renewed one), every total and a replayed broadcast are the
    allocator's; the steps keep the trajectory of `local_step`."""
    ours, reference = _spec(torch.device("cpu")), _spec(torch.device("cpu"))
    size, dtype = gradient_layout(ours)
    alloc = Recording()
    collective = TreeAllReduce(
        "w0", lambda *a: None, size=size, dtype=dtype, bucket_bytes=64, alloc=alloc
    )
    sync = GradientSync(_config(), ours, torch.device("cpu"), collective)
    assert alloc.made(sync.buf)
    assert not sync.buf.any()
    for step in range(3):
        loss, total = _step(sync, collective, step)
        assert alloc.made(total)
        assert loss == local_step(reference, sync.sample_ids(step), BATCH)
    sync.renew()
    assert alloc.made(sync.buf)
    loss, total = _step(sync, collective, 3)
    assert loss == local_step(reference, sync.sample_ids(3), BATCH)
    replayed = asyncio.run(collective.broadcast(ALONE, 4, total))
    assert alloc.made(replayed)
    assert np.array_equal(replayed, total)
    assert alloc.made(zeros := asyncio.run(collective.broadcast(ALONE, 5, None)))
    assert not zeros.any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_buffers_are_pinned_and_the_trajectory_kept() -> None:
    """A model on a GPU: the contribution and every total live in page-locked memory, and
    the steps equal `local_step` on the same device."""
    device = torch.device("cuda")
    assert torch.from_numpy(pinned_empty(10, np.float32)).is_pinned()
    ours, reference = _spec(device), _spec(device)
    size, dtype = gradient_layout(ours)
    collective = TreeAllReduce(
        "w0", lambda *a: None, size=size, dtype=dtype, alloc=host_alloc(device)
    )
    sync = GradientSync(_config(), ours, device, collective)
    assert torch.from_numpy(sync.buf).is_pinned()
    for step in range(3):
        loss, total = _step(sync, collective, step)
        assert torch.from_numpy(total).is_pinned()
        expected = local_step(reference, sync.sample_ids(step), BATCH)
        assert loss == pytest.approx(expected, rel=1e-12)
