"""Warm spares on Kubernetes (#17, the operator's part): `spec.spares`, the pool the reconcile
keeps, a spare made a member by a patch, and what the status says of them."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest
from chaos_operator.api import ChaosJob
from chaos_operator.pods import ANN_CONFIG, LABEL_ROLE, ROLE_MEMBER, ROLE_SPARE
from chaos_operator.reconcile import ObservedPod, PodPlan, reconcile, running_members
from chaos_operator.spares import activation
from chaos_worker.config import WorkerConfig
from chaos_worker.join.activation import join_order
from pydantic import ValidationError

from tests.unit.test_jobspec import NOW, advance, condition, make_job
from tests.unit.test_reconcile import observed

pytestmark = pytest.mark.unit


def names(pods: list[dict[str, Any]]) -> list[str]:
    return [p["metadata"]["name"] for p in pods]


def config(pod: dict[str, Any] | ObservedPod) -> WorkerConfig:
    meta = pod.annotations if isinstance(pod, ObservedPod) else pod["metadata"]["annotations"]
    return WorkerConfig.model_validate_json(meta[ANN_CONFIG])


def role(pod: dict[str, Any]) -> str:
    return pod["metadata"]["labels"][LABEL_ROLE]


def started(spares: int = 1, **spec: Any) -> tuple[ChaosJob, dict[str, ObservedPod]]:
    """A job of 2 members and `spares` spares, every pod running."""
    job = make_job(spares=spares, **spec)
    plan = reconcile(job, [], now=NOW)
    return advance(job, plan), {p["metadata"]["name"]: observed(p, "Running") for p in plan.create}


def activated(pod: ObservedPod, plan: PodPlan) -> ObservedPod:
    """`pod` after the plan's patch (what the API server stores)."""
    patch = plan.activate[pod.name]["metadata"]
    return replace(
        pod,
        labels={**pod.labels, **patch["labels"]},
        annotations={**pod.annotations, **patch["annotations"]},
    )


@pytest.mark.parametrize("spares", [-1, 17])
def test_spec_spares_is_bounded(spares: int) -> None:
    with pytest.raises(ValidationError, match="spares"):
        make_job(spares=spares)
    assert make_job().spec.spares == 0


def test_a_new_job_gets_its_initial_set_and_a_spare_that_is_no_member() -> None:
    job = make_job(spares=1)
    plan = reconcile(job, [], now=NOW)
    assert names(plan.create) == ["digits-w0", "digits-w1", "digits-w2"]
    members, spare = plan.create[:2], plan.create[2]
    assert [role(p) for p in members] == [ROLE_MEMBER, ROLE_MEMBER] and role(spare) == ROLE_SPARE
    assert set(config(members[0]).members) == {"digits-w0", "digits-w1"}  # not the spare
    standby = config(spare)
    assert standby.standby and standby.standby_file == "/etc/chaos/config.json"
    assert not standby.members and standby.join is None
    assert plan.events["digits-w2"].reason == "SpareAdded"
    assert plan.status["replicas"] == 2 and plan.status["spares"] == "0/1"
    assert plan.next_member == 3
    # all running: the spare is ready, the job Ready, and nothing more is planned
    job, pods = advance(job, plan), [observed(p, "Running") for p in plan.create]
    again = reconcile(job, pods, now=NOW)
    assert again.create == again.delete == [] and not again.activate
    assert again.status["spares"] == "1/1" and again.status["localMembers"] == 2
    assert condition(again, "Ready") == ("True", "MembersRunning")
    assert running_members(pods).keys() == {"digits-w0", "digits-w1"}


def test_a_lost_member_is_replaced_by_the_spare_which_the_worker_obeys() -> None:
    job, pods = started()
    pods["digits-w1"] = replace(pods["digits-w1"], phase="Failed")
    plan = reconcile(job, list(pods.values()), now=NOW)
    assert list(plan.activate) == ["digits-w2"]  # the spare, not a new pod, is the member
    assert names(plan.create) == ["digits-w3"] and role(plan.create[0]) == ROLE_SPARE
    assert plan.delete == ["digits-w1"]
    assert plan.events["digits-w2"].reason == "MemberAdded"
    assert "warm spare" in plan.events["digits-w2"].message
    assert plan.status["replicas"] == 2 and plan.status["spares"] == "0/1"
    member = activated(pods["digits-w2"], plan)
    assert member.labels[LABEL_ROLE] == ROLE_MEMBER and not member.spare
    seed = pods["digits-w0"].address
    # the waiting worker accepts the new file: its own config, standby ended, a seed
    text = member.annotations[ANN_CONFIG]
    assert join_order(config(pods["digits-w2"]), text) == seed
    # next round: the activated spare is a live member; nothing more is created
    after = {**pods, "digits-w2": member, "digits-w3": observed(plan.create[0], "Running")}
    del after["digits-w1"]
    again = reconcile(advance(job, plan), list(after.values()), now=NOW)
    assert again.create == again.delete == [] and not again.activate
    assert again.status["spares"] == "1/1"


def test_a_scale_up_takes_the_spare_and_tops_the_pool_up() -> None:
    job, pods = started()
    plan = reconcile(advance(job, PodPlan([], [], {}, job.status.to_k8s(), 3, {}), replicas=3),
                     list(pods.values()), now=NOW)  # fmt: skip
    assert list(plan.activate) == ["digits-w2"] and names(plan.create) == ["digits-w3"]


def test_a_lost_spare_is_replaced_quietly() -> None:
    job, pods = started(failurePolicy={"maxMemberFailures": 0})
    pods["digits-w2"] = replace(pods["digits-w2"], phase="Failed")
    plan = reconcile(job, list(pods.values()), now=NOW)
    assert plan.delete == ["digits-w2"] and names(plan.create) == ["digits-w3"]
    assert "digits-w2" not in plan.events  # no MemberLost, no Event at all
    assert [e.reason for e in plan.events.values()] == ["SpareAdded"]
    assert plan.status["phase"] == "Running" and not plan.status.get("memberFailures")
    assert condition(plan, "Degraded") == ("False", "AsExpected")
    # a spare deleted by hand (gone from the list) is no membership event either
    del pods["digits-w2"]
    plan = reconcile(job, list(pods.values()), now=NOW)
    assert names(plan.create) == ["digits-w3"] and plan.status["phase"] == "Running"


def test_fewer_spares_deletes_the_newest_and_a_hand_edited_spare_is_replaced() -> None:
    job, pods = started(spares=2)
    plan = reconcile(advance(job, PodPlan([], [], {}, job.status.to_k8s(), 4, {}), spares=1),
                     list(pods.values()), now=NOW)  # fmt: skip
    assert plan.delete == ["digits-w3"] and plan.create == [] and plan.events == {}
    # a spare whose config was edited by hand cannot be ordered: replaced, never activated
    broken = replace(pods["digits-w2"], annotations={ANN_CONFIG: json.dumps({"id": "x"})})
    assert activation(broken, "127.0.0.1:1") is None
    pods["digits-w2"] = broken
    pods["digits-w1"] = replace(pods["digits-w1"], phase="Failed")
    plan = reconcile(job, list(pods.values()), now=NOW)
    assert list(plan.activate) == ["digits-w3"]
    assert sorted(plan.delete) == ["digits-w1", "digits-w2"]
    assert names(plan.create) == ["digits-w4", "digits-w5"]


def test_spares_go_when_the_job_stops_or_training_ends() -> None:
    job, pods = started()
    suspended = reconcile(advance(job, PodPlan([], [], {}, job.status.to_k8s(), 3, {}),
                                  suspend=True), list(pods.values()), now=NOW)  # fmt: skip
    assert "digits-w2" in suspended.delete and suspended.create == []
    trained = reconcile(job, list(pods.values()), now=NOW, current_step=10**9 - 1)
    assert trained.delete == ["digits-w2"] and trained.create == []


def test_no_spare_for_an_initial_set_nor_for_the_checkpoint_writer() -> None:
    job, pods = started(checkpoints={"claimName": "ckpt"})
    writer = next(p for p in pods.values() if p.writer)
    # the writer lost: its replacement must mount the claim, so it is a new pod
    pods[writer.name] = replace(writer, phase="Failed")
    plan = reconcile(job, list(pods.values()), now=NOW)
    assert not plan.activate
    assert [config(p).checkpoint_dir for p in plan.create] == ["/checkpoints"]
    # every member lost: a new initial set of new pods, the spare waits on
    for name in ("digits-w0", "digits-w1"):
        pods[name] = replace(pods[name], phase="Failed")
    plan = reconcile(job, list(pods.values()), now=NOW)
    assert not plan.activate and "digits-w2" not in plan.delete
    assert [role(p) for p in plan.create] == [ROLE_MEMBER, ROLE_MEMBER]
