"""A small MLP on scikit-learn's 8x8 handwritten digits (1797 samples, no download)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import nn


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.data / 16.0, data.target


class PairDataset:
    """In-memory ``(input, target)`` pairs: ``len()`` and ``dataset[i]``."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        if len(inputs) != len(targets):
            raise ValueError(f"{len(inputs)} inputs but {len(targets)} targets")
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[index], self.targets[index]


def factory(*, seed: int, dtype: torch.dtype, device: torch.device):
    """MLP 64 -> 64 -> 10 (ReLU; no BatchNorm, no dropout), SGD lr 0.05 momentum 0.9.

    Inputs are scaled to [0, 1] and kept on CPU in ``dtype``; the loss is the default
    per-sample cross entropy.
    """
    del seed  # the caller seeds torch; the data has no randomness
    x, y = _digits()
    dataset = PairDataset(torch.tensor(x, dtype=dtype), torch.tensor(y, dtype=torch.long))
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).to(
        device=device, dtype=dtype
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, optimizer, dataset
