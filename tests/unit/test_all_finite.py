"""`all_finite`, the check every bucket passes (a member's own before it is sent, every
received one before it is held): a dot product with itself first, number by number only
when that is not finite, so finite numbers too large to square or add are never taken for
a NaN or an infinity."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from chaos_worker.collective import all_finite


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_one_nan_or_infinity_anywhere_is_found(dtype, bad) -> None:
    for where in (0, 500, 999):
        numbers = np.ones(1000, dtype)
        numbers[where] = bad
        assert not all_finite(numbers)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_infinities_of_both_signs_are_found(dtype) -> None:
    numbers = np.zeros(10, dtype)
    numbers[[2, 7]] = (np.inf, -np.inf)  # their sum is a NaN, their squares' an infinity
    assert not all_finite(numbers)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("scale", [0.5, 1.0])
def test_finite_numbers_whose_squares_or_sum_overflow_are_finite(dtype, scale) -> None:
    numbers = np.full(8, np.finfo(dtype).max * scale, dtype)
    with np.errstate(over="ignore"):
        assert not np.isfinite(np.dot(numbers, numbers))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the check itself warns of nothing
        assert all_finite(numbers)


def test_ordinary_and_empty_buffers_are_finite() -> None:
    assert all_finite(np.random.default_rng(0).standard_normal(10_000).astype(np.float32))
    assert all_finite(np.zeros(0, np.float64))
