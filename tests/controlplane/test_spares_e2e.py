"""Warm spares on Kubernetes (#17), end to end on a real API server: a job with `spares: 1`
gets a standby pod that is no member; when a member's pod is deleted, the operator makes the
spare a member by patching its config annotation (the pod runner re-projects it, as the
kubelet does), it trains, and a new spare replaces it in the pool; deleting a spare is no
membership event."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.controlplane.operatorrun import JobView, run_operator
from tests.controlplane.test_jobspec_e2e import manifest, plane_with_namespace

pytestmark = pytest.mark.controlplane

ROLE = "chaos.training.dev/role"
MEMBER_EVENTS = {"MemberAdded", "MemberLost", "MemberRemoved"}


def role(pod: dict[str, Any]) -> str:
    return pod["metadata"]["labels"].get(ROLE, "")


def config(pod: dict[str, Any]) -> dict[str, Any]:
    return json.loads(pod["metadata"]["annotations"]["chaos.training.dev/config"])


def members_in_view(job: JobView, pod: dict[str, Any]) -> int:
    """chaos_members of one member (-1 while it does not answer)."""
    samples = job.samples_of(pod, "chaos_members")
    return int(samples[0][1]) if samples else -1


def test_a_spare_replaces_a_lost_member_and_its_own_loss_is_no_membership_event(
    control_plane_factory, tmp_path: Path
) -> None:
    plane, ns = plane_with_namespace(control_plane_factory, "/spares")
    with run_operator(plane, ns, tmp_path) as run:
        job = JobView(plane, ns, "pool")
        plane.apply(manifest("pool", ns, replicas=2, spares=1))
        run.expect(lambda: job.running() == {"pool-w0", "pool-w1", "pool-w2"}, "3 pods")
        pods = job.pods()
        assert [role(pods[n]) for n in ("pool-w0", "pool-w1", "pool-w2")] == [
            "member",
            "member",
            "spare",
        ]
        standby = config(pods["pool-w2"])
        assert standby["standby"] is True and "join" not in standby and "members" not in standby
        assert set(config(pods["pool-w0"])["members"]) == {"pool-w0", "pool-w1"}
        run.expect(lambda: job.status().get("spares") == "1/1", "status.spares 1/1")
        assert job.status()["replicas"] == 2
        table = plane.kubectl("get", "chaosjob", "pool", "-n", ns).stdout
        assert "SPARES" in table and "1/1" in table, table

        # The spare is up (it answers /metrics) but in no view: it trains nothing.
        run.expect(lambda: job.samples_of(pods["pool-w2"], "chaos_train_steps_total"), "spare up")
        run.expect(lambda: job.step() >= 3, "training progress")
        assert members_in_view(job, pods["pool-w0"]) == 2
        assert job.steps_of(pods["pool-w2"]) == 0

        # A member's pod is deleted: the spare becomes the member, a new spare is made.
        plane.kubectl("delete", "pod", "pool-w1", "-n", ns, "--wait=false")
        run.expect(lambda: role(job.pods().get("pool-w2", {"metadata": {"labels": {}}}))
                   == "member", "the spare made a member")  # fmt: skip
        ordered = config(job.pods()["pool-w2"])
        assert ordered["standby"] is False and ordered["join"] == config(pods["pool-w0"])["listen"]
        run.expect(lambda: job.running() == {"pool-w0", "pool-w2", "pool-w3"}, "new spare")
        pods = job.pods()
        assert role(pods["pool-w3"]) == "spare" and config(pods["pool-w3"])["standby"] is True
        run.expect(lambda: job.steps_of(pods["pool-w2"]) > 0, "the former spare trains")
        run.expect(lambda: members_in_view(job, pods["pool-w2"]) == 2, "w2 in a view of 2")
        added = [e["message"] for e in job.event_list() if e["reason"] == "MemberAdded"]
        assert any("pool-w2 (a warm spare) joins through pool-w0" in m for m in added), added
        # the replacement was no new pod: 2 members + 2 spares created in all
        assert run.operator_metric("chaos_operator_pods_created_total") == 4

        # A spare's pod is deleted: a new spare, and no membership event at all.
        before = [e["reason"] for e in job.event_list()]
        plane.kubectl("delete", "pod", "pool-w3", "-n", ns, "--wait=false")
        run.expect(lambda: job.running() == {"pool-w0", "pool-w2", "pool-w4"}, "spare replaced")
        run.expect(lambda: job.status().get("spares") == "1/1", "pool topped up")
        step = job.step()
        run.expect(lambda: job.step() >= step + 3, "training goes on")
        after = [e["reason"] for e in job.event_list()][len(before) :]
        assert not MEMBER_EVENTS & set(after), after
        assert "SpareAdded" in after, after
        pods = job.pods()
        assert members_in_view(job, pods["pool-w0"]) == 2
        status = job.status()
        assert status["phase"] == "Running" and not status.get("memberFailures"), status
        assert run.process.poll() is None, run.diagnose()
