"""What several benches measure alike: the model a bench trains (the sized `mlp` example or
a bundled one), a steady step time from step stamps, and two measured parts of a
torchrun-style restart: a bare process's start and a checkpoint's save and load.
"""

from __future__ import annotations

import io
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from chaos_cli.errors import UserError

MLP = "chaos_worker.examples.mlp:factory"
BUSY_FAILURE_TIMEOUT_S = 5.0
"""Failure timeout of a bench's local runs: their members share the machine's cores with
a busy bench, and a 1 s timeout would take a busy member for a crashed one (TorchFT's
default is 5 s). A crash is still found at once: its links close and its port refuses."""


def mlp_model(size: str, option: str = "--sizes") -> tuple[str, str, str]:
    """`(label, entry, size)` of the `mlp` example of `size` parameters (e.g. 1M)."""
    from chaos_worker.examples.mlp import parse_count

    try:
        parse_count(size)
    except ValueError as exc:
        raise UserError(f"{option}: {exc}") from None
    return f"mlp-{size}", MLP, size


def example_model(name: str, option: str = "--examples") -> tuple[str, str, None]:
    """`(label, entry, None)` of the bundled example `name`."""
    from chaos_worker.examples import EXAMPLES

    if name not in EXAMPLES:
        raise UserError(f"{option}: {name!r} unknown; choose from {sorted(EXAMPLES)}")
    return name, EXAMPLES[name], None


@contextmanager
def mlp_params(size: str | None) -> Iterator[None]:
    """`CHAOS_MLP_PARAMS` set to `size` (None: left alone) while inside; the processes
    started there (workers, DDP ranks, bare processes) inherit it."""
    from chaos_worker.examples.mlp import ENV

    saved = os.environ.get(ENV)
    if size is not None:
        os.environ[ENV] = size
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = saved


def param_count(entry: str) -> int:
    """Trainable parameters of the model `entry`'s factory builds."""
    import torch
    from chaos_worker.training.trainspec import load_trainspec

    spec = load_trainspec(entry, seed=0, dtype=torch.float32, device=torch.device("cpu"))
    return sum(p.numel() for p in spec.model.parameters() if p.requires_grad)


def steady_step_s(stamps: list[float], warmup: int) -> float:
    """Median gap between consecutive step stamps, the first `warmup` steps left out."""
    kept = stamps[warmup:]
    gaps = [b - a for a, b in itertools.pairwise(kept)]
    if not gaps:
        raise UserError("too few steps after the warm-up to take a step time")
    return statistics.median(gaps)


def bare_process(
    entry: str, env: Mapping[str, str] | None = None, dtype: str = "float32"
) -> subprocess.Popen:
    """Start a bare process of a job: the interpreter, torch (one thread) and `entry`'s
    factory (model, optimizer, data), nothing of Chaos; `env` added to ours."""
    module, _, name = entry.partition(":")
    code = (
        f"import torch; torch.set_num_threads(1); from {module} import {name} as factory;"
        f"factory(seed=0, dtype=torch.{dtype}, device=torch.device('cpu'))"
    )
    env = {**os.environ, **(env or {}), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code], env=env)


def bare_start_s(entry: str, env: Mapping[str, str] | None = None, dtype: str = "float32") -> float:
    """Wall seconds a bare process of `entry` (`bare_process`) takes from spawn to exit."""
    started = time.monotonic()
    code = bare_process(entry, env, dtype).wait()
    if code != 0:
        raise RuntimeError(f"the bare process of {entry} exited with code {code}")
    return time.monotonic() - started


@dataclass(frozen=True)
class CheckpointIO:
    save_s: float
    """torch.save of the state to a local file, fsync included."""
    load_s: float
    """reading the file back (`read`) and torch.load of it."""
    bytes: int


def checkpoint_round_trip(state: dict, read: Callable[[Path], bytes] | None = None) -> CheckpointIO:
    """Time saving `state` to a temporary file (written through to disk) and loading it
    back, the file's bytes read by `read` (default: straight from the file)."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "checkpoint.pt"
        started = time.monotonic()
        with path.open("wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        save_s = time.monotonic() - started
        size = path.stat().st_size
        started = time.monotonic()
        blob = read(path) if read is not None else path.read_bytes()
        torch.load(io.BytesIO(blob), weights_only=True)
        load_s = time.monotonic() - started
    return CheckpointIO(save_s, load_s, size)
