"""Gradient sums are membership-invariant; the examples train."""

from __future__ import annotations

import pytest
import torch
from chaos_worker.examples import EXAMPLES
from chaos_worker.training.compute import (
    apply_flat_grads,
    flatten_grads,
    gradient_sum,
    local_step,
    trainable_parameters,
)
from chaos_worker.training.sampling import split_by_throughput, step_sample_ids
from chaos_worker.training.trainspec import TrainSpec, load_trainspec
from hypothesis import given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.unit

CPU = torch.device("cpu")
SEED = 11


def load(name: str, dtype: torch.dtype = torch.float64) -> TrainSpec:
    return load_trainspec(EXAMPLES[name], seed=SEED, dtype=dtype, device=CPU)


@pytest.fixture(scope="module")
def digits() -> TrainSpec:
    return load("digits")


@pytest.fixture(scope="module")
def full_batch(digits: TrainSpec) -> tuple[list[int], float, torch.Tensor]:
    ids = step_sample_ids(SEED, 3, 256, len(digits.dataset))
    loss = gradient_sum(digits, ids, micro_batch=len(ids))
    return ids, loss, flatten_grads(digits.model)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@given(
    speeds=st.lists(st.floats(0.0, 10.0), min_size=1, max_size=4),
    micro_batch=st.integers(5, 80),
)
@settings(max_examples=15, deadline=None)
def test_gradient_is_invariant_to_the_split(
    digits: TrainSpec, full_batch: tuple, speeds: list[float], micro_batch: int
) -> None:
    ids, full_loss, full_grad = full_batch
    parts = split_by_throughput(ids, {f"m{i}": s for i, s in enumerate(speeds)})
    total_grad, total_loss = torch.zeros_like(full_grad), 0.0
    for share in parts.values():
        total_loss += gradient_sum(digits, share, micro_batch=micro_batch)
        total_grad += flatten_grads(digits.model)
    assert relative_error(total_grad, full_grad) < 1e-12
    assert abs(total_loss - full_loss) <= 1e-12 * abs(full_loss)


def test_no_samples_gives_zero_grads_not_none(digits: TrainSpec) -> None:
    for p in digits.model.parameters():
        p.grad = None
    assert gradient_sum(digits, []) == 0.0
    grads = [p.grad for p in digits.model.parameters()]
    assert all(g is not None and not g.any() for g in grads)


def test_gradient_sum_overwrites_previous_grads(digits: TrainSpec) -> None:
    ids = list(range(20))
    gradient_sum(digits, ids)
    first = flatten_grads(digits.model)
    gradient_sum(digits, ids)
    assert torch.equal(flatten_grads(digits.model), first)


def test_flat_roundtrip_and_scaling(digits: TrainSpec) -> None:
    gradient_sum(digits, list(range(10)))
    flat = flatten_grads(digits.model)
    params = trainable_parameters(digits.model)
    assert flat.shape == (sum(p.numel() for p in params),)
    assert torch.equal(flat, torch.nn.utils.parameters_to_vector([p.grad for p in params]))
    apply_flat_grads(digits.model, flat, 0.5)
    assert torch.equal(flatten_grads(digits.model), flat * 0.5)
    with pytest.raises(ValueError):
        apply_flat_grads(digits.model, flat[:-1], 1.0)


def test_loss_fn_must_be_per_sample() -> None:
    spec = load("digits")
    spec.loss_fn = lambda out, y: torch.nn.functional.cross_entropy(out, y)
    with pytest.raises(ValueError, match="one loss per sample"):
        gradient_sum(spec, [0, 1, 2])


def train(spec: TrainSpec, steps: int, global_batch: int) -> list[float]:
    n = len(spec.dataset)
    return [
        local_step(spec, step_sample_ids(SEED, t, global_batch, n), global_batch)
        for t in range(steps)
    ]


def test_digits_trains_in_float64() -> None:
    losses = train(load("digits"), 30, 64)
    assert sum(losses[-5:]) / 5 < 0.75 * sum(losses[:5]) / 5


def test_chartransformer_trains() -> None:
    losses = train(load("chartransformer", torch.float32), 12, 16)
    assert losses[0] == pytest.approx(4.3, abs=0.5)  # ~ln(vocab) at initialisation
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3


def test_training_is_reproducible_bit_for_bit() -> None:
    first, second = load("digits"), load("digits")
    assert train(first, 3, 32) == train(second, 3, 32)
    assert torch.equal(
        torch.nn.utils.parameters_to_vector(first.model.parameters()),
        torch.nn.utils.parameters_to_vector(second.model.parameters()),
    )


def test_chartransformer_gradient_is_invariant_to_the_split() -> None:
    spec = load("chartransformer")
    ids = step_sample_ids(SEED, 0, 24, len(spec.dataset))
    full_loss = gradient_sum(spec, ids, micro_batch=len(ids))
    full_grad = flatten_grads(spec.model)
    total_grad, total_loss = torch.zeros_like(full_grad), 0.0
    for share in split_by_throughput(ids, {"a": 1.0, "b": 2.5, "c": 0.7}).values():
        total_loss += gradient_sum(spec, share, micro_batch=4)
        total_grad += flatten_grads(spec.model)
    assert relative_error(total_grad, full_grad) < 1e-12
    assert abs(total_loss - full_loss) <= 1e-12 * abs(full_loss)
