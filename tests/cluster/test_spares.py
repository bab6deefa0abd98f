"""Warm spares (`chaos run --spares N`): a join takes the waiting spare, and a spare lost
while waiting is no event for the trainers. Losses in float64 equal the churn-free run's."""

from __future__ import annotations

import asyncio
import signal

import pytest
from chaos_cli.local.churn import parse_churn
from chaos_cli.local.launcher import JobOptions, LocalRun
from chaos_worker.examples import EXAMPLES

from tests.cluster.test_run import assert_same_losses, run_job

pytestmark = pytest.mark.cluster

STEPS = 600
LONG = 1_000_000
"""Steps of a run that ends once its joiner trained (`stop_after_join_steps`), not at a
step: a spare started again takes as long as the machine makes it, and the trainers do
not wait for it, so no fixed number of steps leaves it time to join."""
JOB = ("--workers", "3", "--steps", str(STEPS), "--dtype", "float64")
JOIN = "join@450"


@pytest.fixture(scope="module")
def churn_free(tmp_path_factory) -> dict:
    return run_job(tmp_path_factory.mktemp("spares"), "none", *JOB, "--churn", "none")


def assert_one_clean_join(report: dict, churn_free: dict, *, stopped: bool = False) -> None:
    """One join of w3, nobody removed, one final state; the losses of every step both runs
    made equal the churn-free ones (`stopped`: a run ended once the joiner trained)."""
    if stopped:
        done = report["steps"]
        assert report["problems"] == [f"only {done} of {LONG} steps completed"]
        shared = min(done, STEPS)
        assert_same_losses(report["loss_curve"][:shared], churn_free["loss_curve"][:shared])
    else:
        assert report["problems"] == []
        assert report["steps"] == STEPS
        assert_same_losses(report["loss_curve"], churn_free["loss_curve"])
    assert [(e["type"], e["worker"]) for e in report["events"]] == [("join", "w3")]
    assert report["events"][0]["scale_out_delay_s"] is not None
    # w3 is added once, by the join, and nobody is ever removed
    added = [c for c in report["membership"] if c["added"]]
    assert [c["added"] for c in added] == [["w3"]]
    assert all(not c["removed"] for c in report["membership"])
    if not stopped:  # a stopped run's workers are ended mid-run, with no final state
        digests = {p["state_sha256"] for p in report["processes"] if p["state_sha256"]}
        assert len(digests) == 1


def test_a_join_takes_the_waiting_spare(churn_free, tmp_path) -> None:
    report = run_job(tmp_path, "spare", *JOB, "--churn", JOIN, "--spares", "1")
    assert_one_clean_join(report, churn_free)
    assert report["spares"]["used"] == ["w3"]
    assert report["spares"]["lost"] == []
    starts = {p["name"]: p["start"] for p in report["processes"]}
    assert starts["w3"] == "spare"
    assert starts["w0"] == "member"
    # the pool was topped up once w3 joined: a new spare waited, unused, until the end
    assert report["spares"]["unused"] == ["w4"]
    assert starts["w4"] == "spare"


def test_a_spare_lost_while_waiting_is_no_membership_event(churn_free) -> None:
    options = JobOptions(
        entry=EXAMPLES["digits"],
        workers=3,
        steps=LONG,
        dtype="float64",
        churn=parse_churn(JOIN, 3),
        example="digits",
        spares=1,
        stop_after_join_steps=20,
    )
    killed: list[int] = []

    def kill_the_spare_once(run: LocalRun) -> None:
        proc = run.procs.get("w3")
        if not killed and proc is not None and proc.standby:
            proc.popen.send_signal(signal.SIGKILL)
            killed.append(proc.popen.pid)

    report = asyncio.run(LocalRun(options, on_update=kill_the_spare_once).run()).model_dump()
    assert killed
    assert_one_clean_join(report, churn_free, stopped=True)
    assert report["spares"]["lost"] == ["w3"]
    assert report["spares"]["used"] == ["w3"]
    w3 = [p for p in report["processes"] if p["name"] == "w3"]
    assert w3[0]["pid"] == killed[0]
    assert w3[0]["exit_code"] == -signal.SIGKILL
    # the one started again waited as a spare and joined (it trained: the run stopped then)
    assert [p["start"] for p in w3] == ["spare", "spare"]
