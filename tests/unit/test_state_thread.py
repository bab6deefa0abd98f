"""The state thread: whole-state copies in order, settled before the state changes."""

from __future__ import annotations

import asyncio
import threading

import pytest
from chaos_worker.training.state_thread import StateThread

pytestmark = pytest.mark.unit


def test_settle_waits_for_every_copy_asked_before_it() -> None:
    """A copy the trainer did not ask for (a joiner's state) still ends before `settle`
    returns, so the update after it cannot change the tensors under it."""
    thread = StateThread()
    release, done = threading.Event(), []

    def copy(name: str) -> str:
        release.wait()
        done.append(name)
        return name

    async def scenario() -> None:
        thread.submit(copy, "publish")
        saving = thread.run(copy, "joiner")
        settled = asyncio.ensure_future(asyncio.to_thread(thread.settle))
        await asyncio.sleep(0.05)
        assert not settled.done() and not done  # held by the copies
        release.set()
        assert await settled is not None
        assert done == ["publish", "joiner"]  # in the order asked
        assert await saving == "joiner"

    asyncio.run(scenario())
    assert thread.settle() is None  # nothing asked since
    thread.close()


def test_a_trainers_copy_fails_the_update_and_a_joiners_fails_only_its_caller() -> None:
    thread = StateThread()

    def fail(what: str) -> None:
        raise OSError(what)

    async def scenario() -> None:
        saving = thread.run(fail, "joiner")
        with pytest.raises(OSError, match="joiner"):
            await saving
        thread.settle()  # the joiner's failure is its caller's
        thread.submit(fail, "publish")
        with pytest.raises(OSError, match="publish"):
            thread.settle()
        assert thread.settle() is None  # raised once

    asyncio.run(scenario())
    thread.close()
