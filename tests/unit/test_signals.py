"""`priority.ignore_from_now`: a process that is stopping ignores further signals, and the
event loop's wakeup fd is let go of before the loop closes it.

asyncio closes its self-pipe before it removes its signal handlers, so a second signal in
between (a replicator's death signal right after its SIGTERM) printed "Exception ignored
when trying to write to the signal wakeup fd ... Bad file descriptor" into a worker's log.
That window is too short to hit on purpose; this checks what closes it, in a process of
its own, with real signals.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

PROGRAM = """
import asyncio, os, signal
from chaos_worker.priority import ignore_from_now

async def main():
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    os.kill(os.getpid(), signal.SIGTERM)
    await stop.wait()
    ignore_from_now(loop, [signal.SIGTERM])
    os.kill(os.getpid(), signal.SIGTERM)  # a second one: ignored, the cleanup goes on
    await asyncio.sleep(0.01)
    ignored = signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    print("wakeup fd", signal.set_wakeup_fd(-1), "ignored", ignored)

asyncio.run(main())
os.kill(os.getpid(), signal.SIGTERM)  # after the loop closed: still ignored
print("exited cleanly")
"""


def test_a_stopping_process_ignores_a_second_signal_and_lets_go_of_the_wakeup_fd() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["wakeup fd -1 ignored True", "exited cleanly"]
    assert result.stderr == ""
