"""Membership-independent sample selection.

Which samples step ``t`` trains on is a pure function of ``(seed, t)``; how they are
divided among the current members is a pure function of the sample list and the measured
speeds. Per-sample randomness (augmentation) is keyed by ``(seed, step, sample_id)``, never
by rank, so the trajectory does not depend on who computed which sample.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fractions import Fraction
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

#: Speed used for members that report a non-positive or non-finite throughput.
MIN_SPEED = 1e-9

#: Domain tag mixed into the per-sample seed so it never collides with the epoch streams.
_SAMPLE_RNG_TAG = 0x5EED_5A3B


@lru_cache(maxsize=8)
def _epoch_permutation(seed: int, epoch: int, dataset_len: int) -> np.ndarray:
    perm = np.random.Generator(np.random.PCG64([seed, epoch])).permutation(dataset_len)
    perm.setflags(write=False)
    return perm


def step_sample_ids(seed: int, step: int, global_batch: int, dataset_len: int) -> list[int]:
    """Return the ``global_batch`` dataset indices of ``step``.

    Epoch ``e`` is the permutation drawn by ``Generator(PCG64([seed, e]))``; the epochs are
    concatenated and step ``t`` takes positions ``[t*G, (t+1)*G)``. A step may straddle an
    epoch boundary, and ``G > dataset_len`` simply spans several epochs.
    """
    if seed < 0 or step < 0:
        raise ValueError(f"seed and step must be >= 0, got seed={seed} step={step}")
    if global_batch < 1 or dataset_len < 1:
        raise ValueError(
            f"global_batch and dataset_len must be >= 1, got {global_batch} and {dataset_len}"
        )
    start, stop = step * global_batch, (step + 1) * global_batch
    ids: list[int] = []
    for epoch in range(start // dataset_len, (stop - 1) // dataset_len + 1):
        base = epoch * dataset_len
        lo, hi = max(start, base) - base, min(stop, base + dataset_len) - base
        ids.extend(_epoch_permutation(seed, epoch, dataset_len)[lo:hi].tolist())
    return ids


def _speed(value: float) -> float:
    return value if math.isfinite(value) and value > MIN_SPEED else MIN_SPEED


def split_by_throughput(
    sample_ids: Sequence[int], speeds: Mapping[str, float]
) -> dict[str, list[int]]:
    """Split ``sample_ids`` into contiguous slices, one per member, sized by speed.

    Members are taken in sorted id order. Sizes are proportional to speed with
    largest-remainder rounding (exact rational arithmetic; ties go to the smaller id), so
    every sample is assigned exactly once. Non-positive or non-finite speeds count as
    :data:`MIN_SPEED`. Every member gets a key, possibly with an empty list.
    """
    if not speeds:
        raise ValueError("split_by_throughput needs at least one member")
    members = sorted(speeds)
    weights = {m: Fraction(_speed(float(speeds[m]))) for m in members}
    total = sum(weights.values())
    n = len(sample_ids)
    quotas = {m: n * weights[m] / total for m in members}
    sizes = {m: math.floor(q) for m, q in quotas.items()}
    leftover = n - sum(sizes.values())
    by_remainder = sorted(members, key=lambda m: (-(quotas[m] - sizes[m]), m))
    for m in by_remainder[:leftover]:
        sizes[m] += 1
    out: dict[str, list[int]] = {}
    pos = 0
    for m in members:
        out[m] = list(sample_ids[pos : pos + sizes[m]])
        pos += sizes[m]
    return out


def sample_generator(seed: int, step: int, sample_id: int) -> torch.Generator:
    """Return the RNG for per-sample randomness of ``sample_id`` at ``step``.

    This is the only randomness a dataset may use (e.g. for augmentation): it depends on
    ``(seed, step, sample_id)`` alone, so a sample is transformed identically whichever
    member computes it. Never use the global torch/numpy RNG or anything keyed by rank.
    """
    import torch

    state = np.random.SeedSequence([seed, step, sample_id, _SAMPLE_RNG_TAG])
    key = int(state.generate_state(1, dtype=np.uint64)[0])
    gen = torch.Generator()
    gen.manual_seed(key)
    return gen
