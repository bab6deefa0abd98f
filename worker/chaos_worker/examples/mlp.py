"""A wide MLP sized by parameter count, for `chaos bench throughput`: 4 x Linear(w, w)
with GELU between them, per-sample cross entropy over w classes, AdamW.

``CHAOS_MLP_PARAMS`` (default ``1M``; ``K``/``M`` suffixes) picks the width ``w`` so that
the four layers hold about that many parameters (``4 * (w*w + w)``). The data is a seeded
synthetic set of ``SAMPLES`` random inputs with random labels: the bench measures step
time, not learning.
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from chaos_worker.examples.digits import PairDataset

ENV = "CHAOS_MLP_PARAMS"
LAYERS = 4
SAMPLES = 1024


def parse_count(text: str) -> int:
    """`1M` -> 1_000_000, `500K` -> 500_000, `1234` -> 1234."""
    text = text.strip().upper()
    scale = {"K": 1_000, "M": 1_000_000}.get(text[-1:], 1)
    digits = text[:-1] if scale > 1 else text
    try:
        value = int(float(digits) * scale)
    except ValueError:
        raise ValueError(f"expected a parameter count like 1M or 500K, got {text!r}") from None
    if value < LAYERS * 2:
        raise ValueError(f"a parameter count must be at least {LAYERS * 2}, got {text!r}")
    return value


def width_for(params: int) -> int:
    """The width w whose 4 layers hold about `params` parameters."""
    return max(1, round((-1 + math.sqrt(1 + 4 * params / LAYERS)) / 2))


def build(width: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(LAYERS):
        layers.append(nn.Linear(width, width))
        if i < LAYERS - 1:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


def factory(*, seed: int, dtype: torch.dtype, device: torch.device):
    """MLP of ``CHAOS_MLP_PARAMS`` parameters, AdamW lr 1e-3, synthetic data."""
    width = width_for(parse_count(os.environ.get(ENV, "1M")))
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(SAMPLES, width, generator=generator, dtype=dtype)
    targets = torch.randint(0, width, (SAMPLES,), generator=generator)
    model = build(width).to(device=device, dtype=dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, optimizer, PairDataset(inputs, targets)
