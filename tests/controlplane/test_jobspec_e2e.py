"""The ChaosJob a real team writes (#19), end to end on a real API server: the pod template
reaches the pods, owned fields are refused by admission, `suspend` removes and brings back
the pods, `spec.steps` ends the job Succeeded for good, a deadline ends it Failed and the TTL
deletes it."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import pytest

from tests.controlplane.operatorrun import JobView, run_operator
from tests.controlplane.plane import ControlPlane, install_crds

pytestmark = pytest.mark.controlplane

TOLERATION = {"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}
TEMPLATE = {
    "metadata": {"labels": {"team": "vision"}},
    "spec": {
        "nodeSelector": {"pool": "training"},
        "tolerations": [TOLERATION],
        "volumes": [{"name": "data", "emptyDir": {}}],
        "containers": [
            {
                "name": "trainer",
                "env": [{"name": "DATA_DIR", "value": "/data"}],
                "volumeMounts": [{"name": "data", "mountPath": "/data", "readOnly": True}],
            }
        ],
    },
}


def manifest(name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "chaos.training.dev/v1alpha1",
        "kind": "ChaosJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "federation": name,
            "image": "chaos-train:0.1.0",
            "entry": "chaos_worker.examples.digits:factory",
            "globalBatch": 32,
            "replicas": 2,
            "minReplicas": 1,
            "maxReplicas": 4,
            **spec,
        },
    }


def plane_with_namespace(control_plane_factory, prefix: str) -> tuple[ControlPlane, str]:
    plane = control_plane_factory(prefix)
    install_crds(plane)  # before the garbage collector starts, so it watches ChaosJobs at once
    plane.start_controller_manager()
    ns = f"js-{secrets.token_hex(3)}"
    plane.kubectl("create", "namespace", ns)
    return plane, ns


def conditions(job: JobView) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in job.status().get("conditions", [])}


def patch_spec(plane: ControlPlane, ns: str, name: str, **spec: Any) -> None:
    plane.kubectl(
        "patch", "chaosjob", name, "-n", ns, "--type=merge", "-p", json.dumps({"spec": spec})
    )


def test_template_reaches_the_pods_and_suspend_removes_and_restores_them(
    control_plane_factory, tmp_path: Path
) -> None:
    plane, ns = plane_with_namespace(control_plane_factory, "/jobspec-template")
    owned = manifest("owned", ns, template={"spec": {"containers": [
        {"name": "trainer", "command": ["python", "train.py"]}]}})  # fmt: skip
    refused = plane.kubectl("create", "-f", "-", input=json.dumps(owned), check=False)
    assert refused.returncode != 0, "an owned field was admitted"
    assert "spec.template.spec.containers[0].command" in refused.stderr, refused.stderr
    assert "owned by the operator" in refused.stderr, refused.stderr

    with run_operator(plane, ns, tmp_path) as run:
        job = JobView(plane, ns, "team")
        plane.apply(manifest("team", ns, template=TEMPLATE))
        run.expect(lambda: job.running() == {"team-w0", "team-w1"}, "2 pods")
        for name, pod in job.pods().items():
            spec = pod["spec"]
            assert spec["nodeSelector"] == {"pool": "training"}, name
            assert TOLERATION in spec["tolerations"], name
            assert {"name": "data", "emptyDir": {}} in spec["volumes"], name
            assert pod["metadata"]["labels"]["team"] == "vision"
            trainer = next(c for c in spec["containers"] if c["name"] == "trainer")
            assert {"name": "DATA_DIR", "value": "/data"} in trainer["env"]
            assert "/data" in {m["mountPath"] for m in trainer["volumeMounts"]}
            assert trainer["command"][:2] == ["chaos", "worker"]
        run.expect(lambda: job.step() >= 1, "training progress")

        # suspend: every pod goes and none comes back while suspended
        patch_spec(plane, ns, "team", suspend=True)
        run.expect(lambda: not job.pods(), "pods removed")
        run.expect(lambda: job.status().get("phase") == "Suspended", "phase Suspended")
        assert conditions(job)["Suspended"] == ("True", "JobSuspended")
        assert job.status()["replicas"] == 0
        run.expect(lambda: not run.runner.alive(), "processes stopped")
        assert "Suspended" in job.events()

        # resume: new members form a new initial set and train
        patch_spec(plane, ns, "team", suspend=False)
        run.expect(lambda: job.running() == {"team-w2", "team-w3"}, "pods back")
        run.expect(lambda: job.status().get("phase") == "Running", "phase Running")
        assert conditions(job)["Suspended"] == ("False", "JobResumed")
        assert "Resumed" in job.events()
        run.expect(lambda: all(job.steps_of(p) > 0 for p in job.pods().values()), "training")
        assert run.process.poll() is None, run.diagnose()


def test_a_job_that_reaches_its_steps_succeeds_for_good(
    control_plane_factory, tmp_path: Path
) -> None:
    plane, ns = plane_with_namespace(control_plane_factory, "/jobspec-steps")
    # The resync's scrapes see steps short of the last; the members that linger after the
    # first one ended say the last step was done (the operator asks them then).
    with run_operator(plane, ns, tmp_path) as run:
        job = JobView(plane, ns, "short")
        plane.apply(manifest("short", ns, steps=25, bucketKiB=16))  # buckets of 16 KiB
        run.expect(lambda: job.running() == {"short-w0", "short-w1"}, "2 pods")
        configs = [json.loads(p["metadata"]["annotations"]["chaos.training.dev/config"])
                   for p in job.pods().values()]  # fmt: skip
        assert {(c["steps"], c["bucket_bytes"]) for c in configs} == {(25, 16 << 10)}
        run.expect(lambda: job.status().get("phase") == "Succeeded", "phase Succeeded")
        status = job.status()
        assert conditions(job)["Complete"] == ("True", "TrainingFinished")
        assert status["steps"] == 25 and status["completionTime"]
        assert "Succeeded" in job.events()
        assert set(job.pods()) == {"short-w0", "short-w1"}  # kept, as a Job keeps its pods
        # each trainer said its last step as it ended: its termination message
        run.expect(lambda: all(trainer_message(p) for p in job.pods().values()), "messages")
        assert {trainer_message(p) for p in job.pods().values()} == {'{"step": 24}'}
        # deleting the finished pods changes nothing: no new member, still Succeeded
        plane.kubectl("delete", "pods", "--all", "-n", ns, "--wait=false")
        run.expect(lambda: not job.pods(), "pods deleted")
        plane.kubectl("annotate", "chaosjob", "short", "-n", ns, "poke=1")  # a reconcile
        run.expect(lambda: job.body()["metadata"]["annotations"].get("poke") == "1", "poked")
        assert job.status()["phase"] == "Succeeded" and not job.pods()
        assert run.process.poll() is None, run.diagnose()


def test_a_deadline_fails_the_job_and_its_ttl_deletes_it(
    control_plane_factory, tmp_path: Path
) -> None:
    plane, ns = plane_with_namespace(control_plane_factory, "/jobspec-deadline")
    with run_operator(plane, ns, tmp_path) as run:
        job = JobView(plane, ns, "late")
        plane.apply(
            manifest("late", ns, replicas=1, activeDeadlineSeconds=15, ttlSecondsAfterFinished=8)
        )
        run.expect(lambda: job.running() == {"late-w0"}, "1 pod")
        run.expect(lambda: job.status().get("phase") == "Failed", "phase Failed")
        assert conditions(job)["Failed"] == ("True", "DeadlineExceeded")
        assert "DeadlineExceeded" in job.events()
        run.expect(lambda: not job.pods(), "pods removed")
        assert job.status()["phase"] == "Failed"  # sticky: nothing is created again
        # the TTL: the ChaosJob is deleted a while after it failed
        gone = plane.kubectl("get", "chaosjob", "late", "-n", ns, check=False)
        assert gone.returncode == 0
        run.expect(
            lambda: plane.kubectl("get", "chaosjob", "late", "-n", ns, check=False).returncode,
            "job deleted after its TTL",
        )
        assert run.process.poll() is None, run.diagnose()


def trainer_message(pod: dict) -> str | None:
    """The termination message of a pod's ended trainer container, if any."""
    for status in pod.get("status", {}).get("containerStatuses") or ():
        if status["name"] == "trainer":
            return (status.get("state", {}).get("terminated") or {}).get("message")
    return None
