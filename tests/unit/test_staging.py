"""Where a step's host buffers come from and how the gradient reaches them
(`training/staging.py`): the collective's allocator makes every contribution and total, so a
job on a GPU stages through pinned memory, and a gradient kept apart from the buffer is
copied into it bucket by bucket, each released only once copied.

The allocator is real numpy and torch, the backward real; the GPU tests run only where
CUDA is (`scripts/gpu-check.sh` runs this file on the device).
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
from chaos_worker.training.compute import (
    FlatGradients,
    gradient_sum,
    local_step,
    trainable_parameters,
)
from chaos_worker.training.overlap import BucketMap
from chaos_worker.training.staging import BucketStaging, host_alloc, pinned_empty
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


def _staged(device: torch.device) -> tuple[TrainSpec, torch.Tensor, np.ndarray]:
    """A model on `device` whose gradients are views of a vector there, and a host buffer
    of NaN (what no released bucket may show) for them, the loss and the count."""
    spec = _spec(device)
    count = sum(p.numel() for p in trainable_parameters(spec.model))
    flat = torch.zeros(count, dtype=torch.float64, device=device)
    return spec, flat, np.full(count + 2, np.nan)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_each_staged_bucket_is_released_once_after_its_copy(device: str) -> None:
    """Buckets final to the hooks are copied from the gradient's own vector and released
    by `computed` on the compute thread, each once, holding its final values, the last
    layer's first; the loop's `finish` afterwards releases nothing more."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    per = 8
    spec, flat, buf = _staged(torch.device(device))
    grads = FlatGradients(spec.model, flat)
    params = trainable_parameters(spec.model)
    buckets = BucketMap(params, bucket_elements=per, buckets=-(-buf.size // per))
    released: list[tuple[int, np.ndarray]] = []
    copies = BucketStaging(torch.device(device), per).step(
        flat, buf, lambda i: released.append((i, buf[i * per : (i + 1) * per].copy()))
    )
    release = buckets.step(buf, 12, copies, copies.drain)
    ids = list(range(12))
    loss = gradient_sum(spec, ids, micro_batch=5, grads=grads, last_backward=release.last_backward)
    assert released == []  # nothing before its copy is known to be done
    release.computed(loss)
    order = [index for index, _ in released]
    assert sorted(order) == list(range(len(buckets.needs)))
    assert order.index(len(order) - 1) < order.index(0)  # the last layer's before the first's
    for index, values in released:
        np.testing.assert_array_equal(values, buf[index * per : (index + 1) * per])
    np.testing.assert_array_equal(buf[:-2], flat.cpu().numpy())
    assert tuple(buf[-2:]) == (loss, 12.0)
    release.finish(loss)
    assert len(released) == len(order)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bucket_bytes", [4 << 20, 64])
def test_on_a_gpu_buffers_are_pinned_and_the_trajectory_kept(bucket_bytes: int) -> None:
    """A model on a GPU: the contribution (also a renewed one) and every total live in
    page-locked memory, and the steps equal `local_step` on the same device, with one
    bucket (copied after the compute) and with many (copied on the side stream while
    backward runs)."""
    device = torch.device("cuda")
    assert torch.from_numpy(pinned_empty(10, np.float32)).is_pinned()
    ours, reference = _spec(device), _spec(device)
    size, dtype = gradient_layout(ours)
    collective = TreeAllReduce(
        "w0",
        lambda *a: None,
        size=size,
        dtype=dtype,
        bucket_bytes=bucket_bytes,
        alloc=host_alloc(device),
    )
    sync = GradientSync(_config(), ours, device, collective)
    assert torch.from_numpy(sync.buf).is_pinned()
    for step in range(4):
        if step == 2:  # as after an abort whose buffer a link still held
            sync.renew()
            assert torch.from_numpy(sync.buf).is_pinned()
        loss, total = _step(sync, collective, step)
        assert torch.from_numpy(total).is_pinned()
        expected = local_step(reference, sync.sample_ids(step), BATCH)
        assert loss == pytest.approx(expected, rel=1e-12)
    for ours_p, reference_p in zip(
        ours.model.parameters(), reference.model.parameters(), strict=True
    ):
        torch.testing.assert_close(ours_p, reference_p, rtol=1e-12, atol=1e-14)
