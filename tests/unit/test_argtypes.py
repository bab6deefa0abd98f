"""The CLI's shared argument types: what they accept and the one line they refuse with."""

from __future__ import annotations

import argparse

import pytest
from chaos_cli.argtypes import mebibytes

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("text", "expected"),
    [("4", 4 << 20), ("0.5", 1 << 19), ("1024", 1 << 30), ("0.0009765625", 1024)],
)
def test_mebibytes_are_whole_bytes(text: str, expected: int) -> None:
    assert mebibytes(text) == expected


@pytest.mark.parametrize("text", ["0", "-1", "0.0001", "2048", "nan", "inf", "4MB", ""])
def test_mebibytes_refuse_sizes_out_of_range_or_not_numbers(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        mebibytes(text)
