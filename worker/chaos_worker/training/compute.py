"""Per-member gradient computation and the flat gradient buffer the collective reduces.

Each member backpropagates the SUM of per-sample losses over its samples; the summed
gradients are all-reduced and every member scales by ``1/G`` before stepping. Only
parameters with ``requires_grad`` take part, in ``model.parameters()`` order.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch

from chaos_worker.training.trainspec import TrainSpec

LastBackward = Callable[[float], AbstractContextManager[object]]
"""Entered around the last micro-batch's backward with the summed loss of all samples
(known once its forward is done): see `training/overlap.py`."""


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters that get gradients, in the order of the flat buffer."""
    return [p for p in model.parameters() if p.requires_grad]


class FlatGradients:
    """The trainable parameters' `.grad` tensors as views of one flat vector, `flat`, in
    the order of `flatten_grads`: backward fills it (`filling`), so the step's gradient
    needs no flattening copy, and the reduced total is written back with one multiply
    (`assign`).

    `bind()` puts a view back wherever something replaced a `.grad` (an optimizer's
    `zero_grad(set_to_none=True)`, user code), keeping its values.
    """

    def __init__(self, model: torch.nn.Module, flat: torch.Tensor) -> None:
        params = trainable_parameters(model)
        count = sum(p.numel() for p in params)
        if flat.dim() != 1 or flat.numel() < count:
            raise ValueError(f"flat buffer of shape {list(flat.shape)} holds no {count} elements")
        self.flat = flat[:count]
        self._params = params
        self._views: list[torch.Tensor] = []
        offset = 0
        for p in params:
            self._views.append(self.flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        self.bind()

    @staticmethod
    def fits(model: torch.nn.Module, flat: torch.Tensor) -> bool:
        """Whether every trainable parameter has `flat`'s dtype and device (a `.grad` view
        must)."""
        params = trainable_parameters(model)
        return bool(params) and all(
            p.dtype == flat.dtype and p.device == flat.device for p in params
        )

    def bind(self) -> None:
        """Make every parameter's `.grad` its view again (values kept)."""
        for p, view in zip(self._params, self._views, strict=True):
            _bind(view, p)

    @contextmanager
    def filling(self) -> Iterator[None]:
        """Around one step's backward passes: every `.grad` starts empty, so autograd
        hands each parameter its first gradient as a tensor of its own, which a hook
        copies into the parameter's view, and the view becomes the `.grad` that later
        micro-batches add to in place. One pass over the vector, where zeroing it and
        adding into it took two (7 % of a 10M mlp step's CPU). Hooks registered
        inside (`overlap.Release`) run after this one, on the view. On leaving, a
        parameter that got no gradient has zeros in its view."""
        for p in self._params:
            p.grad = None
        handles = [
            p.register_post_accumulate_grad_hook(functools.partial(_bind, view))
            for p, view in zip(self._params, self._views, strict=True)
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self.bind()

    def assign(self, total: torch.Tensor, scale: float) -> None:
        """`.grad = total * scale`, written into the views: the values
        `apply_flat_grads(model, total, scale)` writes."""
        if total.shape != self.flat.shape:
            raise ValueError(
                f"flat gradient has shape {list(total.shape)}, expected {list(self.flat.shape)}"
            )
        self.bind()
        if total.device == self.flat.device:
            torch.mul(total, scale, out=self.flat)
        else:
            self.flat.copy_(total)
            self.flat.mul_(scale)


def _bind(view: torch.Tensor, param: torch.Tensor) -> None:
    """Make `view` the `.grad` of `param`, with the values of the `.grad` it replaces
    (zeros for none; a sparse gradient, an `Embedding(sparse=True)`'s, as the dense one
    it stands for). Also the post-accumulate-grad hook of `FlatGradients.filling`."""
    grad = param.grad
    if grad is view or (grad is not None and _same_memory(grad, view)):
        return
    if grad is None:
        view.zero_()
    else:
        view.copy_(grad if grad.layout == torch.strided else grad.to_dense())
    param.grad = view


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.layout != torch.strided or b.layout != torch.strided:
        return False  # a sparse tensor has no one block of memory
    return (
        a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
    )


def _zero_grads(model: torch.nn.Module) -> None:
    for p in trainable_parameters(model):
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        else:
            p.grad.zero_()


def _device_of(model: torch.nn.Module) -> torch.device:
    return trainable_parameters(model)[0].device


def gradient_sum(
    spec: TrainSpec,
    sample_ids: Sequence[int],
    *,
    micro_batch: int = 64,
    grads: FlatGradients | None = None,
    last_backward: LastBackward | None = None,
) -> float:
    """Set ``.grad`` to the gradient of the summed per-sample loss over ``sample_ids``.

    Works in micro-batches of at most ``micro_batch`` samples, accumulating gradients.
    Every trainable parameter ends up with a ``.grad`` tensor (zeros when there are no
    samples); with ``grads``, the views of its flat vector. The last micro-batch's
    backward runs inside ``last_backward(loss)`` where one is given (never without
    samples). Returns the summed loss as a Python float.
    """
    if micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
    model, dataset = spec.model, spec.dataset
    if grads is None:
        _zero_grads(model)
    model.train()
    device = _device_of(model)
    total: torch.Tensor | None = None
    with nullcontext() if grads is None else grads.filling():
        for start in range(0, len(sample_ids), micro_batch):
            chunk = sample_ids[start : start + micro_batch]
            inputs, targets = zip(*(dataset[int(i)] for i in chunk), strict=True)
            x = torch.stack(inputs).to(device, non_blocking=True)
            y = torch.stack(targets).to(device, non_blocking=True)
            per_sample = spec.loss_fn(model(x), y)
            if per_sample.shape != (len(chunk),):
                raise ValueError(
                    f"loss_fn must return one loss per sample, shape [{len(chunk)}], "
                    f"got {list(per_sample.shape)}"
                )
            loss = per_sample.sum()
            total = loss.detach() if total is None else total + loss.detach()
            last = last_backward is not None and start + micro_batch >= len(sample_ids)
            with last_backward(float(total)) if last else nullcontext():
                loss.backward()
    return 0.0 if total is None else float(total)


def flatten_grads(model: torch.nn.Module) -> torch.Tensor:
    """Concatenate the trainable parameters' gradients into one new contiguous vector."""
    params = trainable_parameters(model)
    return torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
    )


def apply_flat_grads(model: torch.nn.Module, flat: torch.Tensor, scale: float) -> None:
    """Write ``flat * scale`` back into each trainable parameter's ``.grad``."""
    params = trainable_parameters(model)
    expected = sum(p.numel() for p in params)
    if flat.dim() != 1 or flat.numel() != expected:
        raise ValueError(f"flat gradient has shape {list(flat.shape)}, expected [{expected}]")
    offset = 0
    for p in params:
        n = p.numel()
        piece = flat[offset : offset + n].view_as(p) * scale
        if p.grad is None:
            p.grad = torch.empty_like(p)
        p.grad.copy_(piece)
        offset += n


def local_step(
    spec: TrainSpec, sample_ids: Sequence[int], global_batch: int, *, micro_batch: int = 64
) -> float:
    """One churn-free, single-process step: gradient sum, scale by ``1/G``, optimizer step.

    The reference trajectory an elastic run must reproduce. Returns the mean loss.
    """
    loss_sum = gradient_sum(spec, sample_ids, micro_batch=micro_batch)
    apply_flat_grads(spec.model, flatten_grads(spec.model), 1.0 / global_batch)
    spec.optimizer.step()
    return loss_sum / global_batch
