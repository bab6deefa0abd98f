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

STEPS = 600  # long enough for a lost spare to be started again before the join
JOB = ("--workers", "3", "--steps", str(STEPS), "--dtype", "float64")
JOIN = "join@450"


@pytest.fixture(scope="module")
def churn_free(tmp_path_factory) -> dict:
    return run_job(tmp_path_factory.mktemp("spares"), "none", *JOB, "--churn", "none")


def assert_one_clean_join(report: dict, churn_free: dict) -> None:
    assert report["problems"] == []
    assert report["steps"] == STEPS
    assert_same_losses(report["loss_curve"], churn_free["loss_curve"])
    assert [(e["type"], e["worker"]) for e in report["events"]] == [("join", "w3")]
    assert report["events"][0]["scale_out_delay_s"] is not None
    # w3 is added once, by the join, and nobody is ever removed
    added = [c for c in report["membership"] if c["added"]]
    assert [c["added"] for c in added] == [["w3"]]
    assert all(not c["removed"] for c in report["membership"])
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
        steps=STEPS,
        dtype="float64",
        churn=parse_churn(JOIN, 3),
        example="digits",
        spares=1,
    )
    killed: list[int] = []

    def kill_the_spare_once(run: LocalRun) -> None:
        proc = run.procs.get("w3")
        if not killed and proc is not None and proc.standby:
            proc.popen.send_signal(signal.SIGKILL)
            killed.append(proc.popen.pid)

    report = asyncio.run(LocalRun(options, on_update=kill_the_spare_once).run()).model_dump()
    assert killed
    assert_one_clean_join(report, churn_free)
    assert report["spares"]["lost"] == ["w3"]
    assert report["spares"]["used"] == ["w3"]
    w3 = [p for p in report["processes"] if p["name"] == "w3"]
    assert w3[0]["pid"] == killed[0]
    assert [p["exit_code"] for p in w3] == [-signal.SIGKILL, 0]  # the restarted one joined
