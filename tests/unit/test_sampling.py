"""Membership-independent sample selection and splitting."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from chaos_worker.training.sampling import sample_generator, split_by_throughput, step_sample_ids
from hypothesis import given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.unit


def test_step_ids_are_deterministic_and_seed_dependent() -> None:
    assert step_sample_ids(3, 5, 32, 100) == step_sample_ids(3, 5, 32, 100)
    assert step_sample_ids(3, 5, 32, 100) != step_sample_ids(4, 5, 32, 100)
    assert all(isinstance(i, int) for i in step_sample_ids(3, 5, 32, 100))


def test_step_ids_follow_the_epoch_permutations() -> None:
    n, g = 10, 4
    epochs = [np.random.Generator(np.random.PCG64([9, e])).permutation(n) for e in range(3)]
    stream = np.concatenate(epochs).tolist()
    for t in range(7):
        assert step_sample_ids(9, t, g, n) == stream[t * g : (t + 1) * g]


@given(
    seed=st.integers(0, 2**32),
    n=st.integers(1, 60),
    g=st.integers(1, 150),
    steps=st.integers(1, 6),
)
@settings(max_examples=60, deadline=None)
def test_each_epoch_visits_every_sample_once(seed: int, n: int, g: int, steps: int) -> None:
    ids = [i for t in range(steps) for i in step_sample_ids(seed, t, g, n)]
    assert len(ids) == steps * g
    for e in range(len(ids) // n):
        assert sorted(ids[e * n : (e + 1) * n]) == list(range(n))


def test_global_batch_larger_than_dataset() -> None:
    ids = step_sample_ids(1, 0, 25, 10)
    assert len(ids) == 25
    assert sorted(ids[:10]) == list(range(10)) and sorted(ids[10:20]) == list(range(10))


@pytest.mark.parametrize(("seed", "step", "g", "n"), [(-1, 0, 1, 1), (0, -1, 1, 1), (0, 0, 0, 1)])
def test_step_ids_reject_bad_arguments(seed: int, step: int, g: int, n: int) -> None:
    with pytest.raises(ValueError):
        step_sample_ids(seed, step, g, n)


speeds_strategy = st.dictionaries(
    st.text("abcdefgh", min_size=1, max_size=3),
    st.one_of(st.floats(-5, 1e6), st.sampled_from([0.0, math.inf, math.nan])),
    min_size=1,
    max_size=8,
)


@given(ids=st.lists(st.integers(0, 10**6), max_size=300), speeds=speeds_strategy)
@settings(max_examples=200, deadline=None)
def test_split_assigns_every_sample_once_in_order(ids: list[int], speeds: dict) -> None:
    parts = split_by_throughput(ids, speeds)
    assert list(parts) == sorted(speeds)
    assert [i for m in sorted(parts) for i in parts[m]] == ids
    assert split_by_throughput(ids, dict(reversed(speeds.items()))) == parts


@given(
    n=st.integers(0, 500),
    speeds=st.dictionaries(
        st.text("xyz", min_size=1, max_size=2), st.floats(0.01, 100), min_size=1, max_size=6
    ),
)
@settings(max_examples=200, deadline=None)
def test_split_sizes_are_within_one_of_the_quota(n: int, speeds: dict) -> None:
    parts = split_by_throughput(list(range(n)), speeds)
    total = sum(speeds.values())
    for member, share in parts.items():
        assert abs(len(share) - n * speeds[member] / total) < 1 + 1e-9


def test_split_examples() -> None:
    ids = list(range(10))
    assert split_by_throughput(ids, {"b": 1.0, "a": 1.0}) == {"a": ids[:5], "b": ids[5:]}
    assert split_by_throughput(ids, {"a": 3.0, "b": 1.0}) == {"a": ids[:8], "b": ids[8:]}
    assert split_by_throughput([1, 2, 3], {"c": 1, "b": 1, "a": 1}) == {
        "a": [1],
        "b": [2],
        "c": [3],
    }
    assert split_by_throughput([7], {"b": 1.0, "a": 1.0}) == {"a": [7], "b": []}
    assert split_by_throughput(ids, {"a": 1.0, "dead": 0.0, "neg": -3.0}) == {
        "a": ids,
        "dead": [],
        "neg": [],
    }
    assert split_by_throughput(ids, {"a": 0.0, "b": -1.0}) == {"a": ids[:5], "b": ids[5:]}


def test_split_needs_members() -> None:
    with pytest.raises(ValueError):
        split_by_throughput([1, 2], {})


def test_sample_generator_is_keyed_by_seed_step_and_sample() -> None:
    def draw(*key: int) -> torch.Tensor:
        return torch.rand(4, generator=sample_generator(*key))

    assert torch.equal(draw(1, 2, 3), draw(1, 2, 3))
    for other in [(0, 2, 3), (1, 1, 3), (1, 2, 4), (1, 3, 2)]:
        assert not torch.equal(draw(1, 2, 3), draw(*other))


def test_a_members_speed_is_the_median_of_its_recent_steps_not_the_last_one() -> None:
    """One descheduled step must not halve a member's share of the next view's batch."""
    from chaos_worker.ports import RATE_WINDOW, Progress

    progress = Progress()
    for _ in range(5):
        progress.computed(10, 0.01)  # 1000 samples/s
    progress.computed(10, 0.5)  # a step that lost the CPU: 20 samples/s
    progress.computed(0, 0.0)  # a step with no samples says nothing about speed
    assert progress.samples_per_s == 1000.0
    for _ in range(RATE_WINDOW):
        progress.computed(40, 0.01)
    assert progress.samples_per_s == 4000.0  # the window moves on
