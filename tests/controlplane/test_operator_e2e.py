"""The operator end to end on a real API server: `chaos operator` reconciles the sample
ChaosJob into pods that the test pod runner runs as local worker processes; training goes on
through a deleted pod and a scale-up; deleting the job leaves no pod and no process."""

from __future__ import annotations

import json
import secrets
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.controlplane.operatorrun import TIMEOUT_S, JobView, run_operator
from tests.controlplane.plane import REPO, install_crds

pytestmark = pytest.mark.controlplane


def _pulled_equals_served(job: JobView, newcomer: str) -> bool:
    """The bytes `newcomer` received per source equal what each source's pod sent it."""
    pods = job.pods()
    member = pods[newcomer]["metadata"]["labels"]["chaos.training.dev/member"]
    received = {p: v for p, v in job.replication_bytes(pods[newcomer], "received").items() if v}
    sent = {
        pod["metadata"]["labels"]["chaos.training.dev/member"]: job.replication_bytes(
            pod, "sent"
        ).get(member, 0.0)
        for name, pod in pods.items()
        if name != newcomer
    }
    return bool(received) and received == {p: v for p, v in sent.items() if v}


def test_operator_runs_a_job_through_loss_scale_up_and_deletion(
    control_plane_factory, tmp_path: Path
) -> None:
    plane = control_plane_factory("/party-operator")
    install_crds(plane)  # before the garbage collector starts, so it watches ChaosJobs at once
    plane.start_controller_manager()
    ns = f"op-{secrets.token_hex(3)}"
    plane.kubectl("create", "namespace", ns)

    with run_operator(plane, ns, tmp_path) as run:
        runner, operator, liveness = run.runner, run.process, run.liveness
        poll, diagnose = run.poll, run.diagnose
        job = JobView(plane, ns, "digits")

        sample = yaml.safe_load((REPO / "examples" / "chaosjob.yaml").read_text())
        sample["metadata"]["namespace"] = ns
        plane.apply(sample)

        # Three initial members start together and train.
        try:
            poll(
                lambda: job.running() == {"digits-w0", "digits-w1", "digits-w2"},
                "3 pods",
                TIMEOUT_S,
            )
            first = poll(lambda: job.step() >= 2 and job.step(), "training progress", TIMEOUT_S)
        except (TimeoutError, AssertionError) as exc:
            raise AssertionError(f"{exc}\n{diagnose()}") from None
        configs = {n: json.loads(p["metadata"]["annotations"]["chaos.training.dev/config"])
                   for n, p in job.pods().items()}  # fmt: skip
        assert all(len(c["members"]) == 3 for c in configs.values())
        with urllib.request.urlopen(f"http://127.0.0.1:{liveness}/healthz", timeout=5) as r:
            assert r.status == 200
        service = plane.get("service", "digits-workers", ns)
        assert service["spec"]["clusterIP"] == "None"
        status = job.status()
        assert status["selector"] == "chaos.training.dev/job=digits"
        assert status["observedGeneration"] == job.body()["metadata"]["generation"]

        # A deleted pod is replaced by a new member that joins through a live one.
        plane.kubectl("delete", "pod", "digits-w1", "-n", ns, "--wait=false")
        try:
            poll(
                lambda: job.running() == {"digits-w0", "digits-w2", "digits-w3"},
                "replacement",
                TIMEOUT_S,
            )
            pods = job.pods()
            config = json.loads(pods["digits-w3"]["metadata"]["annotations"][
                "chaos.training.dev/config"])  # fmt: skip
            assert "members" not in config
            assert config["join"] in {
                configs["digits-w0"]["listen"],
                configs["digits-w2"]["listen"],
            }
            poll(lambda: job.steps_of(job.pods()["digits-w3"]) > 0, "replacement trains", TIMEOUT_S)
            second = poll(lambda: job.step() > first and job.step(), "progress", TIMEOUT_S)
            poll(lambda: job.status().get("phase") == "Running", "phase Running", TIMEOUT_S)
        except (TimeoutError, AssertionError) as exc:
            raise AssertionError(f"{exc}\n{diagnose()}") from None
        poll(lambda: "digits-w1" not in runner.alive(), "deleted pod's processes stopped")

        # Scaling up adds a member that joins through the data plane.
        plane.kubectl("scale", "chaosjob/digits", "--replicas=4", "-n", ns)
        try:
            poll(lambda: "digits-w4" in job.running(), "scaled-up member", TIMEOUT_S)
            poll(lambda: job.steps_of(job.pods()["digits-w4"]) > 0, "new member trains", TIMEOUT_S)
            # what it pulled, its sources' replicator containers served, and their
            # trainers count it (the sidecars' ledgers in the pods' shared volume)
            poll(lambda: _pulled_equals_served(job, "digits-w4"), "bytes served", TIMEOUT_S)
            poll(lambda: job.step() > second, "progress after scale-up", TIMEOUT_S)
            poll(
                lambda: job.status().get("replicas") == 4 and job.status().get("localMembers") == 4,
                "status of 4 members",
                TIMEOUT_S,
            )
        except (TimeoutError, AssertionError) as exc:
            raise AssertionError(f"{exc}\n{diagnose()}") from None
        # The newest joiner's measured scale-out delay reaches the job's status.
        delay = poll(
            lambda: job.status().get("lastScaleOutDelaySeconds"), "scale-out delay", TIMEOUT_S
        )
        assert 0 < delay < TIMEOUT_S, delay
        print(plane.kubectl("get", "chaosjobs", "-n", ns, "-o", "wide").stdout)
        print(json.dumps(job.status(), indent=2))  # shown with pytest -s
        reasons = job.events()
        assert reasons.count("MemberAdded") >= 5, reasons
        ready = {c["type"]: c for c in job.status()["conditions"]}["Ready"]
        assert ready["status"] == "True"

        # Scaling down deletes the newest members; the others train on.
        plane.kubectl("scale", "chaosjob/digits", "--replicas=2", "-n", ns)
        try:
            poll(lambda: job.running() == {"digits-w0", "digits-w2"}, "scaled down", TIMEOUT_S)
            third = job.step()
            poll(lambda: job.step() > third, "progress after scale-down", TIMEOUT_S)
            poll(lambda: job.status().get("phase") == "Running", "phase Running", TIMEOUT_S)
        except (TimeoutError, AssertionError) as exc:
            raise AssertionError(f"{exc}\n{diagnose()}") from None
        assert "MemberRemoved" in job.events()
        poll(lambda: {"digits-w3", "digits-w4"} <= set(runner.exits), "removed stopped")
        # SIGTERM made them leave at an agreed step and exit cleanly, not die mid-step
        clean = {pod: runner.exits[pod]["trainer"] for pod in ("digits-w3", "digits-w4")}
        assert clean == {"digits-w3": 0, "digits-w4": 0}, f"{runner.exits}\n{diagnose()}"
        # The operator's own metrics saw all of it: w0..w4 created, w3 and w4 deleted.
        assert run.operator_metric("chaos_operator_pods_created_total") == 5
        assert run.operator_metric("chaos_operator_pods_deleted_total") >= 2
        assert run.operator_metric('chaos_operator_jobs{phase="Running"}') == 1
        assert run.operator_metric('chaos_operator_reconcile_total{result="ok"}') > 5

        # Deleting the job: the garbage collector removes the pods, the runner their processes.
        plane.kubectl("delete", "chaosjob", "digits", "-n", ns, "--wait=false")
        try:
            poll(lambda: not job.pods(), "pods collected", TIMEOUT_S)
            poll(lambda: not runner.alive(), "processes stopped", TIMEOUT_S)
        except (TimeoutError, AssertionError) as exc:
            raise AssertionError(f"{exc}\n{diagnose()}") from None
        assert operator.poll() is None, diagnose()
    assert not runner.alive()
    assert not runner.errors, runner.errors
