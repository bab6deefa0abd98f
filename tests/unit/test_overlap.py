"""Buckets released by backward's hooks (`training/overlap.py`), on a real small model.

Every test runs real forwards and backwards through `gradient_sum` with the gradients as
views of the buffer (`FlatGradients`), as the trainer does on a CPU; the signal records,
on the compute thread, what each bucket holds when it is released.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from chaos_worker.examples.digits import PairDataset
from chaos_worker.training.compute import FlatGradients, gradient_sum, trainable_parameters
from chaos_worker.training.overlap import BucketMap
from chaos_worker.training.trainspec import TrainSpec
from torch import nn

pytestmark = pytest.mark.unit

PER = 8  # elements per bucket


class Net(nn.Module):
    """6 -> 5 -> 4 -> 3; `spare` takes part in no forward (it gets no gradient)."""

    def __init__(self, spare: bool = False) -> None:
        super().__init__()
        self.first, self.middle, self.last = nn.Linear(6, 5), nn.Linear(5, 4), nn.Linear(4, 3)
        self.spare = nn.Linear(3, 2) if spare else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(torch.tanh(self.middle(torch.tanh(self.first(x)))))


class Step:
    """A model, its gradients as views of a buffer, and what each release saw."""

    def __init__(self, *, spare: bool = False, per: int = PER) -> None:
        torch.manual_seed(5)
        model = Net(spare).double()
        data = PairDataset(torch.randn(20, 6, dtype=torch.float64), torch.arange(20) % 3)
        self.spec = TrainSpec(model, torch.optim.SGD(model.parameters(), lr=0.1), data)
        self.params = trainable_parameters(model)
        count = sum(p.numel() for p in self.params)
        self.buf = np.full(count + 2, np.nan)  # what a release must never show
        self.grads = FlatGradients(model, torch.from_numpy(self.buf[:-2]))
        self.per = per
        self.map = BucketMap(self.params, bucket_elements=per, buckets=-(-(count + 2) // per))
        self.forwards = 0
        model.register_forward_pre_hook(lambda *_: setattr(self, "forwards", self.forwards + 1))
        self.released: list[tuple[int, np.ndarray, int]] = []
        """(bucket, its values when released, forwards done by then)."""

    def bucket(self, index: int) -> np.ndarray:
        return self.buf[index * self.per : (index + 1) * self.per]

    def signal(self, index: int) -> None:
        self.released.append((index, self.bucket(index).copy(), self.forwards))

    def run(self, ids: list[int], micro_batch: int = 8) -> float:
        """One step: compute with the release around the last backward, then finish."""
        self.released.clear()
        self.forwards = 0
        release = self.map.step(self.buf, len(ids), self.signal)
        loss = gradient_sum(
            self.spec, ids, micro_batch=micro_batch, grads=self.grads,
            last_backward=release.last_backward,
        )  # fmt: skip
        self.during = len(self.released)
        release.finish(loss)
        return loss

    def buckets_of(self, *params: torch.Tensor) -> set[int]:
        spans = self.map.spans
        return {b for p in params for b in spans[[id(q) for q in self.params].index(id(p))]}


@pytest.mark.parametrize("micro_batch", [8, 20])
def test_each_bucket_is_released_once_holding_its_final_values_last_layer_first(
    micro_batch: int,
) -> None:
    """Micro-batches of 8, 8 and 4 (the last backward adds into the views), or one (its
    backward's gradients are copied into them, before the hooks release their buckets)."""
    step = Step()
    loss = step.run(list(range(20)), micro_batch=micro_batch)
    order = [index for index, _, _ in step.released]
    assert sorted(order) == list(range(len(step.map.needs)))  # each one, once
    assert step.during == len(order)  # every parameter has a gradient: backward released all
    for index, values, forwards in step.released:
        np.testing.assert_array_equal(values, step.bucket(index))  # final when released
        assert forwards == -(-20 // micro_batch)  # earlier micro-batches only accumulate
    model = step.spec.model
    last, first = step.buckets_of(*model.last.parameters()), step.buckets_of(model.first.weight)
    first -= step.buckets_of(*model.middle.parameters())  # a bucket they share waits for both
    assert max(order.index(b) for b in last) < min(order.index(b) for b in first)
    assert tuple(step.buf[-2:]) == (loss, 20.0)


def test_the_bucket_of_the_loss_waits_for_the_last_forward() -> None:
    """Parameters end on a bucket's edge here, so the last bucket holds only the loss and
    the sample count: it is released once the last micro-batch's forward has given the
    step's whole loss, before any gradient of that backward."""
    count = 74  # 6*5+5 + 5*4+4 + 4*3+3
    step = Step(per=count // 2)
    loss = step.run(list(range(20)), micro_batch=8)
    index, values, forwards = step.released[0]
    assert (index, forwards) == (2, 3)
    assert tuple(values[:2]) == (loss, 20.0)
    assert [index for index, _, _ in step.released[1:]] == [1, 0]


def test_buckets_of_parameters_without_gradient_are_released_when_the_compute_returns() -> None:
    step = Step(spare=True)
    step.run(list(range(20)))
    spare = step.buckets_of(*step.spec.model.spare.parameters())
    assert spare == {9, 10}  # 9 shares with the last layer's bias, 10 with the loss
    order = [index for index, _, _ in step.released]
    assert sorted(order) == list(range(len(step.map.needs)))
    assert set(order[step.during :]) == spare  # released by `finish`, and only those
    for index, values, _ in step.released:
        np.testing.assert_array_equal(values, step.bucket(index))  # zeros where unused


def test_without_samples_everything_is_released_when_the_compute_returns() -> None:
    step = Step()
    step.run([])
    assert step.during == 0
    assert sorted(index for index, _, _ in step.released) == list(range(len(step.map.needs)))
    assert tuple(step.buf[-2:]) == (0.0, 0.0)
    assert not np.isnan(step.buf).any()


def test_no_hook_outlives_its_step() -> None:
    step = Step()
    for _ in range(3):
        step.run(list(range(20)))
        assert len(step.released) == len(step.map.needs)  # not once more per earlier step
    # a backward after the step releases nothing
    before = len(step.released)
    x, y = step.spec.dataset[0]
    step.spec.loss_fn(step.spec.model(x[None]), y[None]).sum().backward()
    assert len(step.released) == before
    # and no hook is left registered (torch keeps them in this private dict; no public view)
    for p in step.params:
        assert not getattr(p, "_post_accumulate_grad_hooks", None)


def test_a_backward_that_fails_leaves_no_hook() -> None:
    step = Step()
    step.spec.loss_fn = lambda out, y: torch.zeros(len(y), dtype=out.dtype)  # no graph
    release = step.map.step(step.buf, 4, step.signal)
    with pytest.raises(RuntimeError, match="does not require grad"):
        gradient_sum(step.spec, [0, 1, 2, 3], grads=step.grads, last_backward=release.last_backward)
    for p in step.params:
        assert not getattr(p, "_post_accumulate_grad_hooks", None)
