"""A small MLP on scikit-learn's 8x8 handwritten digits (1797 samples, no download)."""

from __future__ import annotations

import gzip
import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits, read from its data file without importing scikit-learn
    (the import costs a worker's start-up 0.7 s of CPU); through it if the file moved."""
    path = _digits_file()
    if path is None:
        from sklearn.datasets import load_digits

        data = load_digits()
        return data.data / 16.0, data.target
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",")
    return table[:, :-1] / 16.0, table[:, -1].astype(int)


def _digits_file() -> Path | None:
    spec = importlib.util.find_spec("sklearn")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    return None


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
