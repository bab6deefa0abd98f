"""The digits MLP carrying a large frozen table: a job whose state is big but whose
gradient is small, as when a frozen embedding table or teacher travels with the model.

`chaos bench scaleout` uses it to size the state (``CHAOS_STATE_MB``, default 16) while the
step stays compute-bound: only the 64-64-10 MLP trains, so the gradient stream is ~19 kB a
step whatever the state size. The table is a buffer: snapshotted and replicated, never
reduced.

``CHAOS_COMPUTE_US`` (default 0) adds that many microseconds per sample to the forward pass
as a sleep: accelerator time that leaves the host CPU free, so that several workers sharing
a small machine still behave like workers on machines of their own.
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn

from chaos_worker.examples.digits import factory as digits_factory

ENV = "CHAOS_STATE_MB"
COMPUTE_ENV = "CHAOS_COMPUTE_US"


class AcceleratorTime(nn.Module):
    """Identity that sleeps `us_per_sample` microseconds per sample of the batch."""

    def __init__(self, us_per_sample: float) -> None:
        super().__init__()
        self.us_per_sample = us_per_sample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.us_per_sample > 0:
            time.sleep(self.us_per_sample * len(x) / 1e6)
        return x


def factory(*, seed: int, dtype: torch.dtype, device: torch.device):
    """Digits MLP (SGD with momentum) plus a seeded frozen table of ``CHAOS_STATE_MB`` MB."""
    model, optimizer, dataset = digits_factory(seed=seed, dtype=dtype, device=device)
    megabytes = float(os.environ.get(ENV, "16"))
    if megabytes <= 0:
        raise ValueError(f"{ENV} must be positive, got {megabytes}")
    count = int(megabytes * 1e6) // 4
    generator = torch.Generator().manual_seed(seed)
    table = torch.rand(count, generator=generator, dtype=torch.float32)
    model.register_buffer("frozen_table", table.to(device))
    compute_us = float(os.environ.get(COMPUTE_ENV, "0"))
    if compute_us < 0:
        raise ValueError(f"{COMPUTE_ENV} must not be negative, got {compute_us}")
    model.insert(0, AcceleratorTime(compute_us))
    return model, optimizer, dataset
