"""`keep_freed_memory`: a process that frees a large array and allocates it again reuses
the pages instead of faulting new ones in (counted by the kernel: `ru_minflt`). Each case
runs in a fresh interpreter, since malloc's settings hold for a whole process."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

_ARRAYS = 20
_FAULTS = f"""
import resource, sys
import numpy as np
from chaos_worker.heap import keep_freed_memory
kept = sys.argv[1] == "kept" and keep_freed_memory()
np.ones(10_000_000, np.float32)  # 40 MB: above glibc's largest mmap threshold
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range({_ARRAYS}):
    np.ones(10_000_000, np.float32)  # allocated, written and freed, as a step's total is
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS, mode],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return out[0], int(out[1])


def test_freed_memory_is_reused_without_page_faults() -> None:
    kept, faults = _faults("kept")
    assert kept == "True"
    assert faults < _ARRAYS  # reused: not even one fault per array


def test_without_it_every_large_array_is_faulted_in() -> None:
    """The cost the setting removes is real on this machine (so the test above can fail):
    each array is a fresh mapping, faulted in page by page (huge pages, where numpy gets
    them, make fewer and larger faults, still at least one per array)."""
    kept, faults = _faults("default")
    assert kept == "False"
    assert faults >= _ARRAYS
