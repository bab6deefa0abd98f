"""A training factory that starts as a member on a GPU does, for tests of that path on a
machine without one: loading the job takes `CHAOS_SLOW_LOAD_S` more (a CUDA context), and
each process's first forward waits `CHAOS_SLOW_FIRST_STEP_S` on the compute thread with
the GIL free, as torch's ops leave it while CUDA loads their kernels. The digits example
otherwise, so its losses are the churn-free digits run's."""

from __future__ import annotations

import os
import time

import torch
from chaos_worker.examples import digits


def factory(*, seed: int, dtype: torch.dtype, device: torch.device):
    time.sleep(float(os.environ.get("CHAOS_SLOW_LOAD_S", "0")))
    model, optimizer, dataset = digits.factory(seed=seed, dtype=dtype, device=device)
    first = [True]

    def first_step_waits(_module: torch.nn.Module, _inputs: tuple) -> None:
        if first[0]:
            first[0] = False
            time.sleep(float(os.environ.get("CHAOS_SLOW_FIRST_STEP_S", "0")))

    model.register_forward_pre_hook(first_step_waits)
    return model, optimizer, dataset
