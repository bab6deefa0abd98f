"""`FlatGradients`: the gradients as views of one vector give the values of the plain path."""

from __future__ import annotations

import pytest
import torch
from chaos_worker.examples import EXAMPLES
from chaos_worker.examples.digits import PairDataset
from chaos_worker.training.compute import (
    FlatGradients,
    apply_flat_grads,
    flatten_grads,
    gradient_sum,
    trainable_parameters,
)
from chaos_worker.training.trainspec import TrainSpec, load_trainspec
from torch import nn

pytestmark = pytest.mark.unit


def load(name: str, dtype: torch.dtype = torch.float64) -> TrainSpec:
    return load_trainspec(EXAMPLES[name], seed=3, dtype=dtype, device="cpu")


@pytest.mark.parametrize("name", ["digits", "chartransformer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_views_hold_the_plain_gradients_bit_for_bit(name: str, dtype: torch.dtype) -> None:
    plain, viewed = load(name, dtype), load(name, dtype)
    ids = list(range(37))
    count = sum(p.numel() for p in trainable_parameters(viewed.model))
    buffer = torch.full((count + 2,), 7.0, dtype=dtype)  # stale values must not survive
    grads = FlatGradients(viewed.model, buffer[:-2])
    for _ in range(2):  # the second step accumulates into the same views
        loss = gradient_sum(plain, ids, micro_batch=10)
        assert gradient_sum(viewed, ids, micro_batch=10, grads=grads) == loss
        assert torch.equal(buffer[:-2], flatten_grads(plain.model))
        pairs = zip(
            trainable_parameters(viewed.model), trainable_parameters(plain.model), strict=True
        )
        for p, q in pairs:
            assert torch.equal(p.grad, q.grad)
            assert buffer.data_ptr() <= p.grad.data_ptr() < buffer[-2:].data_ptr()
        total = flatten_grads(plain.model) * 3
        apply_flat_grads(plain.model, total, 1 / 48)
        grads.assign(total, 1 / 48)
        assert torch.equal(buffer[:-2], flatten_grads(plain.model))
        plain.optimizer.step()
        viewed.optimizer.step()
    for p, q in zip(viewed.model.parameters(), plain.model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_replaced_grad_is_bound_again_with_its_values() -> None:
    spec = load("digits")
    count = sum(p.numel() for p in trainable_parameters(spec.model))
    grads = FlatGradients(spec.model, torch.zeros(count, dtype=torch.float64))
    gradient_sum(spec, list(range(5)), grads=grads)
    expected = flatten_grads(spec.model)
    spec.optimizer.zero_grad(set_to_none=True)
    first = trainable_parameters(spec.model)[0]
    first.grad = None
    grads.bind()
    assert not grads.flat[: first.numel()].any()
    spec.model[0].bias.grad = torch.ones_like(spec.model[0].bias)
    grads.bind()
    assert spec.model[0].bias.grad.data_ptr() != 0
    assert float(spec.model[0].bias.grad.sum()) == spec.model[0].bias.numel()
    gradient_sum(spec, list(range(5)), grads=grads)
    assert torch.equal(grads.flat, expected)


def test_a_buffer_that_does_not_fit_is_refused() -> None:
    spec = load("digits")
    count = sum(p.numel() for p in trainable_parameters(spec.model))
    assert not FlatGradients.fits(spec.model, torch.zeros(count, dtype=torch.float32))
    with pytest.raises(ValueError):
        FlatGradients(spec.model, torch.zeros(count - 1, dtype=torch.float64))
    grads = FlatGradients(spec.model, torch.zeros(count, dtype=torch.float64))
    with pytest.raises(ValueError):
        grads.assign(torch.zeros(count + 1, dtype=torch.float64), 1.0)


class _Lookup(nn.Module):
    """An embedding with sparse gradients, then a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.out = nn.Embedding(10, 4, sparse=True), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.embed(x))


@pytest.mark.parametrize("micro_batch", [8, 20])
def test_sparse_gradients_fill_their_views_as_dense_ones(micro_batch: int) -> None:
    """An `Embedding(sparse=True)` hands autograd sparse gradients: its view holds the
    dense gradient they stand for, one micro-batch or several, as on the plain path."""
    specs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = _Lookup().double()
        data = PairDataset(torch.arange(20) % 10, torch.arange(20) % 3)
        specs.append(TrainSpec(model, torch.optim.SGD(model.parameters(), lr=0.1), data))
    plain, viewed = specs
    count = sum(p.numel() for p in trainable_parameters(viewed.model))
    grads = FlatGradients(viewed.model, torch.full((count,), 7.0, dtype=torch.float64))
    ids = list(range(20))
    assert gradient_sum(viewed, ids, micro_batch=micro_batch, grads=grads) == gradient_sum(
        plain, ids, micro_batch=micro_batch
    )
    expected = torch.cat([p.grad.to_dense().reshape(-1) for p in plain.model.parameters()])
    assert torch.equal(grads.flat, expected)
    assert all(not p.grad.is_sparse for p in viewed.model.parameters())
