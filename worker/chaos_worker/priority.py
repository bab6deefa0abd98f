"""OS helpers for processes and threads: lower CPU priority, die with the parent, stop
listening for signals, exit at once.

Lower CPU priority is for work that must not slow the training steps around it.

Serving shards (the replicator process) and a newcomer's pull are bulk transfers: a few
milliseconds late costs them nothing, while a training step that waits for a core costs
every member of the job. On Linux the niceness of a thread is its own, so a newcomer runs
its pull in a thread of its own at `BACKGROUND_NICENESS` (inherited by the threads that
thread starts) and keeps its event loop and its training at normal priority.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from typing import NoReturn

BACKGROUND_NICENESS = 10


def lower_this_thread(niceness: int = BACKGROUND_NICENESS) -> None:
    """Raise the calling thread's niceness by `niceness` (ignored where not allowed)."""
    with contextlib.suppress(OSError, AttributeError):
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + niceness)


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None]:
    """A `preexec_fn` that has the child get `sig` when its parent dies (Linux)."""

    def preexec() -> None:  # runs in the child between fork and exec
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG

    return preexec


def ignore_from_now(loop: asyncio.AbstractEventLoop, signals: Iterable[int]) -> None:
    """Stopping already: `signals` that `loop` handled are ignored from now on, so a second
    one (a parent's death signal, a second SIGTERM) neither cuts the cleanup short nor
    reaches the loop's wakeup fd, which asyncio closes before it removes its handlers (a
    signal in between prints "Exception ignored when trying to write to the signal wakeup
    fd" with a traceback)."""
    for sig in signals:
        loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_IGN)


def exit_at_once(code: int) -> NoReturn:
    """End the process with `code` now, skipping the interpreter's teardown (streams and
    log handlers are flushed first).

    For a worker or replicator that has closed its links and removed its files: all that
    is left is freeing a heap that holds torch, about 0.6 s of CPU, which on a busy
    machine took several seconds, long enough for `chaos run` (or a pod's grace period)
    to kill a process that had finished its job."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
