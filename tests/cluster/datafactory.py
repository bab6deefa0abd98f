"""A training factory that reads its data file from a pod's volume, for `chaos run FILE`
tests of the pod template: the file's path comes from the template's env."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from chaos_worker.examples import digits


def factory(*, seed: int, dtype: torch.dtype, device: torch.device):
    """The digits example, once the file `$CHAOS_DATA` names was read; leaves a mark
    beside it (`seen-<pid>`) so the test knows each worker found it."""
    data = Path(os.environ["CHAOS_DATA"])
    marker = data.read_text().strip()
    (data.parent / f"seen-{os.getpid()}").write_text(marker)
    return digits.factory(seed=seed, dtype=dtype, device=device)
