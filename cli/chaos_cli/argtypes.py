"""Argument types shared by the CLI's commands and benchmarks."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def mebibytes(text: str) -> int:
    """An argparse type: a size in MiB (DDP's ``bucket_cap_mb``), fractions allowed, as
    whole bytes of at least 1 KiB."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MiB such as 4 or 0.5, got {text!r}") from None
    if not 1 / 1024 <= value <= 1024:
        raise argparse.ArgumentTypeError(f"must be 1/1024 (1 KiB) to 1024 MiB, got {text}")
    return round(value * (1 << 20))


def positive_ints(text: str) -> list[int]:
    """An argparse type: a comma-separated list of integers >= 1."""
    try:
        return [positive_int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N,N,..., got {text!r}") from None
