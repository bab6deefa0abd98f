"""A training factory whose compute can be held from outside, for tests of a member whose
compute thread is stuck while its event loop still runs: the digits example, whose loss
waits while the file `stuck-<worker id>` exists in `$CHAOS_STUCK_DIR`, and leaves
`held-<worker id>` there once it waits."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from chaos_worker.examples import digits
from chaos_worker.training.trainspec import cross_entropy_per_sample


def _worker_id() -> str:
    """This worker's id: the name of the config file it was started with (none in the
    launcher's own check of the entry)."""
    args = sys.argv
    if "--config" in args[:-1]:
        return Path(args[args.index("--config") + 1]).stem
    return ""


def factory(*, seed: int, dtype: torch.dtype, device: torch.device):
    model, optimizer, dataset = digits.factory(seed=seed, dtype=dtype, device=device)
    here = Path(os.environ["CHAOS_STUCK_DIR"])
    me = _worker_id()
    stuck, held = here / f"stuck-{me}", here / f"held-{me}"

    def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if me and stuck.exists():  # on the compute thread, in the middle of a step
            held.touch()
            while stuck.exists():
                time.sleep(0.01)
        return cross_entropy_per_sample(output, target)

    return model, optimizer, dataset, loss_fn
