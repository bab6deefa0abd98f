"""The autoscaler end to end on a real API server: `chaos operator` measures the goodput of
real worker processes (run by the test pod runner), scales a ChaosJob up from its minimum while
workers pay, back down when the target is out of reach, never leaves [min, max], and explains
each decision in an Event and in `status.autoscaling`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.controlplane.operatorrun import JobView, run_operator
from tests.controlplane.plane import REPO, ControlPlane

pytestmark = pytest.mark.controlplane

SETTLED = {"AtMaximum", "OnTarget", "AtMinimum"}


def test_autoscaler_scales_up_from_min_and_down_within_bounds(
    control_plane: ControlPlane, crds: list[str], namespace: str, tmp_path: Path
) -> None:
    plane, ns = control_plane, namespace
    sample = yaml.safe_load((REPO / "examples" / "chaosjob.yaml").read_text())
    sample["metadata"].update(name="auto", namespace=ns)
    sample["spec"].update(
        replicas=1,
        minReplicas=1,
        maxReplicas=2,
        # any worker that trains at all pays: the job grows from its minimum
        autoscaling={"enabled": True, "targetGoodputPerWorker": 0.001, "cooldownSeconds": 2},
    )
    job = JobView(plane, ns, "auto")
    seen: list[int] = []  # spec.replicas at every look

    def replicas() -> int:
        seen.append(job.body()["spec"]["replicas"])
        return seen[-1]

    def autoscaling() -> dict[str, Any]:
        return job.status().get("autoscaling", {})

    def events(reason: str) -> list[str]:
        return [e["message"] for e in job.event_list() if e["reason"] == reason]

    with run_operator(plane, ns, tmp_path) as run:

        def check(ok: Callable[[], Any], what: str) -> Any:
            return run.expect(lambda: (replicas(), ok())[1], what)

        plane.apply(sample)

        # Up: one worker trains, its goodput is above the target, so a second one joins.
        check(lambda: events("AutoscaleUp"), "an AutoscaleUp event")
        (up,) = events("AutoscaleUp")
        assert "1 -> 2 replicas (GoodputAboveTarget)" in up, up
        assert "samples/s with 1 workers" in up, up
        check(lambda: "auto-w1" in job.running(), "the added member running")
        check(lambda: job.steps_of(job.pods()["auto-w1"]) > 0, "the added member trains")

        # It settles (at 2, or back at 1 if the second worker made the job slower).
        settled = check(lambda: autoscaling().get("reason") in SETTLED and autoscaling(),
                        "a settled decision")  # fmt: skip
        assert settled["goodputSamplesPerSecond"] > 0, settled
        assert "marginalGoodputSamplesPerSecond" in settled, settled
        assert settled["lastDecisionTime"], settled
        assert settled["desiredReplicas"] == replicas()
        conditions = {c["type"]: c for c in job.status()["conditions"]}
        assert conditions["AutoscalingActive"]["status"] == "True", conditions
        assert conditions["AutoscalingActive"]["reason"] in SETTLED | {"Cooldown"}, conditions

        # Down: with a target no worker can reach, two workers shrink to the minimum.
        downs = len(events("AutoscaleDown"))
        patch = {"replicas": 2, "autoscaling": {"targetGoodputPerWorker": 1e9}}
        plane.kubectl("patch", "chaosjob", "auto", "-n", ns, "--type", "merge",
                      "-p", json.dumps({"spec": patch}))  # fmt: skip
        check(lambda: len(events("AutoscaleDown")) > downs, "an AutoscaleDown event")
        down = events("AutoscaleDown")[-1]
        assert "2 -> 1 replicas (MarginalGoodputBelowTarget)" in down, down
        check(lambda: autoscaling().get("reason") == "AtMinimum", "AtMinimum")
        check(lambda: len(job.running()) == 1, "one member left")
        assert replicas() == 1
        delay = job.status().get("lastScaleOutDelaySeconds")
        assert delay is None or delay > 0

        # Clean up (no garbage collector on this API server): the job, then its pods.
        plane.kubectl("delete", "chaosjob", "auto", "-n", ns, "--wait=false")
        plane.kubectl("delete", "pods", "-n", ns, "-l", "chaos.training.dev/job=auto",
                      "--wait=false")  # fmt: skip
        run.expect(lambda: not run.runner.alive(), "worker processes stopped")
    assert seen and all(1 <= n <= 2 for n in seen), seen
    assert not run.runner.errors, run.runner.errors
