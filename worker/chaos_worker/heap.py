"""A training process keeps the memory it frees for its next step.

Every step allocates and frees the same large arrays: autograd's and AdamW's temporaries,
the all-reduce's total, each received bucket. glibc's malloc serves blocks above its mmap
threshold (at most 32 MiB) with fresh `mmap`s and gives them back on `free`, and trims
the heap's top once more than twice that lies free there, so the next step's arrays are
new pages again: faulted in and zeroed by the kernel, page by page. A 10M parameter mlp
worker took 10,000 to 18,000 page faults a step that way, about a fifth of its step time
(ADR 0003, *The heap*). With `mmap` off and no trimming, freed blocks stay in
the heap and the next step reuses them; the process's resident memory stays at its peak,
as PyTorch's CUDA caching allocator keeps device memory. Blocks larger than a thread
arena's heap (64 MiB) are still mapped and unmapped by glibc.

Only for glibc; elsewhere (musl, macOS) nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_NEVER_TRIM = 2**31 - 1  # mallopt's value is a C int


def keep_freed_memory() -> bool:
    """Make glibc's malloc reuse freed memory instead of returning it to the kernel, for the
    rest of this process (see the module docstring); whether it took effect."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, _NEVER_TRIM))
    if not done:
        log.info("malloc kept its defaults: mallopt refused the settings")
    return done
