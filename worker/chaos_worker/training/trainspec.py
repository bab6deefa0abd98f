"""What a job trains, loaded from a user ``module:factory`` entry point.

Factory contract (see ``examples/README.md``)::

    def factory(*, seed: int, dtype: torch.dtype, device: torch.device):
        return model, optimizer, dataset            # or (..., loss_fn)

- ``model``: a ``torch.nn.Module`` already moved to ``dtype``/``device``; no BatchNorm (batch
  statistics depend on how the batch is split) and no unkeyed dropout.
- ``optimizer``: a ``torch.optim.Optimizer`` over the model's parameters.
- ``dataset``: ``len(dataset) > 0`` and ``dataset[i] -> (input, target)`` tensors; items may
  live on CPU. Any randomness must come from
  :func:`chaos_worker.training.sampling.sample_generator`.
- ``loss_fn(output, target)``: returns the *per-sample* loss, shape ``[batch]``; reducing
  extra dimensions (e.g. sequence positions) is the factory's business. The default is
  cross entropy with ``reduction="none"``.

``torch.manual_seed(seed)`` is called right before the factory, so identical seeds give
bit-identical initial parameters.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Dataset(Protocol):
    """Map-style dataset: ``len()`` and ``dataset[i] -> (input, target)``."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]: ...


def cross_entropy_per_sample(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Default loss: per-sample cross entropy, shape ``[batch]``."""
    return F.cross_entropy(output, target, reduction="none")


@dataclass
class TrainSpec:
    """A model, its optimizer, its dataset and the per-sample loss."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    dataset: Dataset
    loss_fn: LossFn = cross_entropy_per_sample


class FactoryError(Exception):
    """A training factory could not be loaded or returned something unusable (one line)."""


def describe_error(exc: BaseException) -> str:
    """`Type: message` of `exc` on one line of at most about 300 characters."""
    text = " ".join(str(exc).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _parse_entry(entry: str) -> tuple[str, str]:
    module, sep, attr = entry.partition(":") if isinstance(entry, str) else ("", "", "")
    if not sep or not module.strip() or not attr.strip() or ":" in attr:
        raise FactoryError(f"malformed entry {entry!r}: expected 'package.module:factory'")
    return module.strip(), attr.strip()


def _import(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and (module == exc.name or module.startswith(exc.name + ".")):
            raise FactoryError(f"module {module!r} not found") from None
        raise FactoryError(f"importing module {module!r} failed: {describe_error(exc)}") from None
    except Exception as exc:
        raise FactoryError(f"importing module {module!r} failed: {describe_error(exc)}") from None


def _resolve(entry: str) -> Callable[..., Any]:
    module_name, attr = _parse_entry(entry)
    obj = _import(module_name)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise FactoryError(f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise FactoryError(f"{entry!r} is not callable (got {type(obj).__name__})")
    return obj


def _same_device(actual: torch.device, wanted: torch.device) -> bool:
    return actual.type == wanted.type and (wanted.index is None or actual.index == wanted.index)


def _check_model(entry: str, model: torch.nn.Module, dtype: torch.dtype, device: torch.device):
    params = list(model.parameters())
    if not any(p.requires_grad for p in params):
        raise FactoryError(f"{entry}: model has no trainable parameters")
    for name, p in model.named_parameters():
        if p.is_floating_point() and p.dtype != dtype:
            raise FactoryError(f"{entry}: parameter {name!r} is {p.dtype}, expected {dtype}")
        if not _same_device(p.device, device):
            raise FactoryError(f"{entry}: parameter {name!r} is on {p.device}, expected {device}")


def _check_optimizer(entry: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    owned = {id(p) for p in model.parameters()}
    for group in optimizer.param_groups:
        if any(id(p) not in owned for p in group["params"]):
            raise FactoryError(f"{entry}: optimizer holds tensors that are not model parameters")


def _check_dataset(entry: str, dataset: Any) -> None:
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise FactoryError(f"{entry}: dataset must support len() and indexing")
    try:
        size = len(dataset)
        item = dataset[0] if size > 0 else None
    except Exception as exc:
        raise FactoryError(f"{entry}: reading the dataset raised {describe_error(exc)}") from None
    if size <= 0:
        raise FactoryError(f"{entry}: dataset is empty")
    if not (
        isinstance(item, tuple | list)
        and len(item) == 2
        and all(isinstance(t, torch.Tensor) for t in item)
    ):
        raise FactoryError(f"{entry}: dataset[0] must be an (input, target) pair of tensors")


def load_trainspec(entry: str, *, seed: int, dtype: torch.dtype, device: torch.device) -> TrainSpec:
    """Seed torch, call the ``module:factory`` ``entry`` and validate what it returns.

    Raises :class:`FactoryError` with one clear line on any failure.
    """
    factory = _resolve(entry)
    device = torch.device(device)
    torch.manual_seed(seed)
    try:
        result = factory(seed=seed, dtype=dtype, device=device)
    except Exception as exc:
        raise FactoryError(f"{entry} raised {describe_error(exc)}") from None
    if not isinstance(result, tuple | list) or len(result) not in (3, 4):
        raise FactoryError(
            f"{entry} must return (model, optimizer, dataset[, loss_fn]), "
            f"got {type(result).__name__}"
            + (f" of length {len(result)}" if isinstance(result, tuple | list) else "")
        )
    model, optimizer, dataset, *rest = result
    loss_fn = rest[0] if rest else cross_entropy_per_sample
    if not isinstance(model, torch.nn.Module):
        raise FactoryError(f"{entry}: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise FactoryError(
            f"{entry}: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    if not callable(loss_fn):
        raise FactoryError(f"{entry}: loss_fn must be callable, got {type(loss_fn).__name__}")
    _check_model(entry, model, dtype, device)
    _check_optimizer(entry, model, optimizer)
    _check_dataset(entry, dataset)
    return TrainSpec(model=model, optimizer=optimizer, dataset=dataset, loss_fn=loss_fn)
