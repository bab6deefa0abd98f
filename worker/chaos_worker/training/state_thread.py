"""The one thread that reads or replaces the whole training state beside the trainer.

Copying a large state takes long: at 50M parameters (600 MB with AdamW's moments) a
copy, a hash or a load takes from a tenth of a second to several on two busy cores. On
the event loop that silences the member past the failure timeout, so the others suspect
it. Every such copy runs here instead, in the order it was asked for: a snapshot
publish, a checkpoint capture, the state a `copy` joiner gets, a witness's digest, a
rejoiner's load. The trainer is the state's only other user; before an update changes
the tensors it waits for what was asked of this thread so far (`settle`), so each copy
sees one step's state.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class StateThread:
    """Runs whole-state copies in order on one thread; see the module docstring."""

    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(1, "state")
        self._pending: list[tuple[concurrent.futures.Future, bool]] = []  # (copy, owned)

    def submit(self, fn: Callable[..., T], *args: object) -> None:
        """Run `fn(*args)` after what was asked before; its failure is raised by the next
        `settle` (the trainer's own copies: a publish, a capture)."""
        self._pending.append((self._pool.submit(fn, *args), True))

    def run(self, fn: Callable[..., T], *args: object) -> asyncio.Future[T]:
        """Run `fn(*args)` after what was asked before; its outcome is the caller's to await
        (a `settle` meanwhile waits for it to end, and raises nothing of it)."""
        future = self._pool.submit(fn, *args)
        self._pending.append((future, False))
        return asyncio.wrap_future(future)

    def settle(self) -> float | None:
        """Wait for everything asked so far (before the state changes); raise the first
        failure of an owned copy. Returns the seconds waited (None: nothing was asked)."""
        pending, self._pending = self._pending, []
        if not pending:
            return None
        started = time.perf_counter()
        concurrent.futures.wait([future for future, _ in pending])
        for future, owned in pending:
            if owned:
                future.result()
        return time.perf_counter() - started

    def close(self) -> None:
        """Wait for what is in flight and stop the thread."""
        self._pool.shutdown()
