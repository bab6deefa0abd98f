"""Deliberately broken training factories for the FactoryError tests."""

from __future__ import annotations

import os
import signal
import sys
import time

import torch
from torch import nn

NOT_CALLABLE = 42


class _Data:
    def __init__(self, n: int = 4) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(2), torch.tensor(0)


def _parts(dtype: torch.dtype = torch.float32, device: str = "cpu"):
    model = nn.Linear(2, 2).to(dtype=dtype, device=device)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def good(*, seed, dtype, device):
    model, opt = _parts(dtype, device)
    return model, opt, _Data()


def good_with_loss(*, seed, dtype, device):
    model, opt = _parts(dtype, device)
    return model, opt, _Data(), lambda out, y: out.sum(dim=1)


def raises(*, seed, dtype, device):
    raise RuntimeError("out of\nmemory")


def wrong_signature(seed):
    return None


def returns_none(*, seed, dtype, device):
    return None


def returns_two(*, seed, dtype, device):
    return _parts(dtype, device)


def not_a_module(*, seed, dtype, device):
    _, opt = _parts(dtype, device)
    return "model", opt, _Data()


def not_an_optimizer(*, seed, dtype, device):
    model, _ = _parts(dtype, device)
    return model, "sgd", _Data()


def no_dataset_protocol(*, seed, dtype, device):
    model, opt = _parts(dtype, device)
    return model, opt, 5


def empty_dataset(*, seed, dtype, device):
    model, opt = _parts(dtype, device)
    return model, opt, _Data(0)


def bad_item(*, seed, dtype, device):
    model, opt = _parts(dtype, device)
    return model, opt, [1, 2, 3]


def loss_not_callable(*, seed, dtype, device):
    model, opt = _parts(dtype, device)
    return model, opt, _Data(), "mse"


def wrong_dtype(*, seed, dtype, device):
    model, opt = _parts(torch.float16, device)
    return model, opt, _Data()


def foreign_optimizer(*, seed, dtype, device):
    model, _ = _parts(dtype, device)
    stray = nn.Parameter(torch.zeros(3, dtype=dtype))
    return model, torch.optim.SGD([stray], lr=0.1), _Data()


def frozen_model(*, seed, dtype, device):
    model, opt = _parts(dtype, device)
    model.requires_grad_(False)
    return model, opt, _Data()


class Stop(BaseException):
    """Not an Exception: what `except Exception` in a loader lets through."""


def raises_base_exception(*, seed, dtype, device):
    raise Stop("no\nthanks")


def raises_keyboard_interrupt(*, seed, dtype, device):
    raise KeyboardInterrupt


def exits(*, seed, dtype, device):
    sys.exit(3)


def exits_hard(*, seed, dtype, device):
    os._exit(0)


def kills_itself(*, seed, dtype, device):
    os.kill(os.getpid(), signal.SIGKILL)


def hangs(*, seed, dtype, device):
    time.sleep(10**6)


class _NanAt(_Data):
    """A dataset whose sample `bad` holds a NaN: whoever computes it has no finite
    gradient."""

    def __init__(self, n: int, bad: int) -> None:
        super().__init__(n)
        self.bad = bad

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.full((2,), float("nan")) if i == self.bad else torch.ones(2)
        return x, torch.tensor(i % 2)


def nan_sample(*, seed, dtype, device):
    model, opt = _parts(dtype, device)
    return model, opt, _NanAt(16, 3)
