"""The launcher's side of churn that needs no worker: whom a newcomer asks to join through,
and how a pause ends (fake processes)."""

from __future__ import annotations

import asyncio
import shutil
import signal
from pathlib import Path

import pytest
from chaos_cli.local.churn import PAUSE_TIMEOUTS, parse_churn
from chaos_cli.local.launcher import JobOptions, LaunchError, LocalRun, _Proc
from chaos_cli.local.timeline import Fired

pytestmark = pytest.mark.unit


class FakePopen:
    """A process that records the signals it gets."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[int] = []
        self.returncode = None

    def poll(self):
        return self.returncode

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)

    def terminate(self) -> None:
        self.signals.append(signal.SIGTERM)

    def wait(self, timeout: float | None = None) -> int:
        self.returncode = -signal.SIGTERM
        return self.returncode


@pytest.fixture
def run(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    churn = parse_churn("pause:w1@5,link-down:w0-w2@6,crash:w3@7,join@8,join@9", 4)
    local = LocalRun(JobOptions(entry="x:y", workers=4, churn=churn, failure_timeout_s=0.04))
    for i, name in enumerate(["w0", "w1", "w2", "w3", "w4", "w5"]):
        local.procs[name] = _Proc(name, FakePopen(100 + i), Path("-"), address=f"h:{i}")
    yield local
    shutil.rmtree(local.run_dir, ignore_errors=True)


def fire(local: LocalRun, *events) -> None:
    for event in events:
        local.timeline.fired.append(Fired(event, 0.0, event.step))


def test_a_newcomer_asks_untouched_members_first(run) -> None:
    pause, cut, crash, join4, _ = run.opts.churn
    fire(run, pause, cut, crash)
    run.procs["w1"].stopped = True  # paused right now
    run._pending = [run.opts.churn[4]]  # w5 still waits for its join
    # w3 crashed, w1 is stopped, w4 is the newcomer, w5 not admitted yet; w0 and w2 had
    # a link cut, so they come after any member no event touched (none here)
    assert run._live_members(newcomer=join4.worker) == ["h:0", "h:2"]
    run.procs["w1"].stopped = False  # awake: back, but after the untouched ones
    assert run._live_members(newcomer=join4.worker) == ["h:0", "h:1", "h:2"]
    for name in ("w0", "w1", "w2"):
        run.procs[name].popen.returncode = 0
    with pytest.raises(LaunchError, match="no live member left"):
        run._live_members(newcomer=join4.worker)


def test_a_pause_stops_the_worker_and_wakes_it_after_the_pause(run) -> None:
    pause = run.opts.churn[0]
    proc = run.procs["w1"]

    async def main() -> None:
        run._inject(pause)
        assert proc.stopped and proc.popen.signals == [signal.SIGSTOP]
        await asyncio.sleep(PAUSE_TIMEOUTS * run.opts.failure_timeout_s + 0.05)
        assert not proc.stopped and proc.popen.signals == [signal.SIGSTOP, signal.SIGCONT]
        assert not proc.killed  # it lives on: its exit code counts

    asyncio.run(main())


def test_a_pause_that_outlasts_the_run_is_cancelled_and_reaped(run) -> None:
    """The run ends while a worker is paused: its wake-up is dropped, and the reaping
    wakes it (SIGCONT) before it is terminated."""
    proc = run.procs["w1"]

    async def main() -> None:
        run.opts.failure_timeout_s = 100.0
        run._inject(run.opts.churn[0])
        for wakeup in run._wakeups:
            wakeup.cancel()
        run._reap()

    asyncio.run(main())
    assert proc.popen.signals == [signal.SIGSTOP, signal.SIGCONT, signal.SIGTERM]
