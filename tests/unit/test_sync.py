"""The synchronisation seam (`training/sync.py`): the loop leaves every step's math to its
`Sync`, and `GradientSync` keeps the trajectory of a plain single-process step.

Real torch on a real small model in float64; a step's contribution goes through the same
`start`/`compute`/`stage` calls and the same `Contribution` the trainer hands the
all-reduce, with one member (its total is its own contribution).
"""

from __future__ import annotations

import ast
import asyncio
import inspect

import numpy as np
import pytest
import torch
from chaos_worker.collective import Contribution, TreeAllReduce
from chaos_worker.config import WorkerConfig
from chaos_worker.examples.digits import PairDataset
from chaos_worker.training import trainer
from chaos_worker.training.compute import local_step
from chaos_worker.training.sync import GradientSync, gradient_layout
from chaos_worker.training.trainspec import TrainSpec
from torch import nn

pytestmark = pytest.mark.unit

BATCH = 16


def spec(seed: int = 3) -> TrainSpec:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 3)).double()
    data = PairDataset(torch.randn(64, 6, dtype=torch.float64), torch.arange(64) % 3)
    return TrainSpec(model, torch.optim.AdamW(model.parameters(), lr=0.01), data)


def config(micro_batch: int) -> WorkerConfig:
    return WorkerConfig(
        id="w0",
        listen="127.0.0.1:0",
        entry="x:y",
        global_batch=BATCH,
        micro_batch=micro_batch,
        members={"w0": "127.0.0.1:1"},
        dtype="float64",
    )


def one_member_step(sync: GradientSync, buckets: int, step: int) -> tuple[float, int]:
    """One step of a job of one member through the seam: (mean loss, state changes seen)."""
    ids = sync.sample_ids(step)
    changes = []

    async def contribute() -> np.ndarray:
        contribution = Contribution(sync.buf, buckets)
        release = sync.start(contribution, len(ids))
        loss = await asyncio.to_thread(sync.compute, ids, release)
        sync.stage(contribution, release, loss, len(ids))
        for index in range(buckets):  # every bucket released, or this never returns
            await contribution.wait(index)
        return sync.buf.copy()

    total = asyncio.run(contribute())
    return sync.update(total, lambda: changes.append(step)), len(changes)


@pytest.mark.parametrize("micro_batch", [BATCH, 5])
def test_gradient_sync_keeps_the_trajectory_of_a_plain_step(micro_batch: int) -> None:
    """Ten steps through the seam (buckets released by backward's hooks, several
    micro-batches or one) give exactly the losses and parameters of `local_step`."""
    ours, reference = spec(), spec()
    size, dtype = gradient_layout(ours)
    collective = TreeAllReduce("w0", lambda *a: None, size=size, dtype=dtype, bucket_bytes=64)
    sync = GradientSync(config(micro_batch), ours, torch.device("cpu"), collective)
    assert collective.buckets > 3  # the overlap path, with several buckets
    for step in range(10):
        loss, changes = one_member_step(sync, collective.buckets, step)
        expected = local_step(reference, sync.sample_ids(step), BATCH, micro_batch=micro_batch)
        assert loss == expected
        assert changes == 1  # the trainer's publish settles once, before the change
    for a, b in zip(ours.model.parameters(), reference.model.parameters(), strict=True):
        assert torch.equal(a, b)


class _Mixed(nn.Module):
    """Parameters of two dtypes: their gradients cannot be views of one flat buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 3).double()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, 3, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.gain.double()


def mixed_spec() -> TrainSpec:
    torch.manual_seed(5)
    model = _Mixed()
    data = PairDataset(torch.randn(64, 6, dtype=torch.float64), torch.arange(64) % 3)
    return TrainSpec(model, torch.optim.AdamW(model.parameters(), lr=0.01), data)


def test_mixed_dtypes_take_the_flattening_path_and_keep_the_trajectory() -> None:
    """No `FlatGradients` (two dtypes): the gradient is flattened after the compute and the
    total written back parameter by parameter, here from a read-only total (as a newcomer's
    replay hands one over), and the total itself is left as it was."""
    ours, reference = mixed_spec(), mixed_spec()
    size, dtype = gradient_layout(ours)
    collective = TreeAllReduce("w0", lambda *a: None, size=size, dtype=dtype, bucket_bytes=64)
    sync = GradientSync(config(BATCH), ours, torch.device("cpu"), collective)
    for step in range(5):
        ids = sync.sample_ids(step)
        contribution = Contribution(sync.buf, collective.buckets)
        loss = sync.compute(ids, sync.start(contribution, len(ids)))
        sync.stage(contribution, None, loss, len(ids))
        total = sync.buf.copy()
        total.setflags(write=False)
        kept = total.copy()
        assert sync.update(total, lambda: None) == local_step(reference, ids, BATCH)
        assert np.array_equal(total, kept)
    for a, b in zip(ours.model.parameters(), reference.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_renewed_buffer_takes_the_gradients_and_the_old_one_is_never_written() -> None:
    """After an abandoned all-reduce that lent `buf` to the links (`Contribution.lent`),
    `renew` gives the sync a fresh buffer: the next steps write their gradients there, the
    old buffer keeps what it held, and the trajectory is that of `local_step`."""
    ours, reference = spec(), spec()
    size, dtype = gradient_layout(ours)
    collective = TreeAllReduce("w0", lambda *a: None, size=size, dtype=dtype, bucket_bytes=64)
    sync = GradientSync(config(BATCH), ours, torch.device("cpu"), collective)
    for step in range(2):
        loss, _ = one_member_step(sync, collective.buckets, step)
        assert loss == local_step(reference, sync.sample_ids(step), BATCH)
    old = sync.buf
    kept = old.copy()
    sync.renew()
    assert sync.buf is not old
    for step in range(2, 5):
        loss, _ = one_member_step(sync, collective.buckets, step)
        assert loss == local_step(reference, sync.sample_ids(step), BATCH)
        grads = [p.grad for p in ours.model.parameters()]
        assert all(np.shares_memory(g.numpy(), sync.buf) for g in grads)
    assert np.array_equal(old, kept)
    for a, b in zip(ours.model.parameters(), reference.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_total_of_another_batch_size_changes_nothing() -> None:
    model = spec()
    size, dtype = gradient_layout(model)
    collective = TreeAllReduce("w0", lambda *a: None, size=size, dtype=dtype, bucket_bytes=1 << 20)
    sync = GradientSync(config(BATCH), model, torch.device("cpu"), collective)
    before = [p.detach().clone() for p in model.model.parameters()]
    total = np.zeros_like(sync.buf)
    total[-1] = BATCH - 1
    with pytest.raises(ValueError, match=r"reduced 15\.0 samples, expected 16"):
        sync.update(total, lambda: None)
    after = list(model.model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_the_step_loop_holds_no_gradient_math() -> None:
    """The seam stays a seam: `trainer.py` reaches the gradient, the sample order and the
    optimizer only through its `Sync`, so a second strategy needs no change to the loop."""
    tree = ast.parse(inspect.getsource(trainer))
    imported = {
        node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    }
    assert "chaos_worker.training.compute" not in imported
    names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert not names & {"step_sample_ids", "backward", "zero_grad", "global_batch"}
