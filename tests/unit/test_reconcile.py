"""The pure reconcile of a ChaosJob: members, ids, joins, scaling and status."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from chaos_operator.api import ChaosJob
from chaos_operator.api.conditions import set_condition
from chaos_operator.pods import (
    ANN_ADDRESS,
    ANN_CONFIG,
    ANN_NEXT_MEMBER,
    ANN_ORDINAL,
    LABEL_JOB,
    LABEL_MEMBER,
    Options,
)
from chaos_operator.reconcile import ObservedPod, PodPlan, reconcile
from chaos_worker.config import WorkerConfig
from hypothesis import given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.unit

NOW = datetime(2026, 11, 22, 15, 0, tzinfo=UTC)


def make_job(
    replicas: int = 3,
    *,
    generation: int = 1,
    next_member: int | None = None,
    status: dict[str, Any] | None = None,
    resources: dict[str, Any] | None = None,
) -> ChaosJob:
    annotations = {} if next_member is None else {ANN_NEXT_MEMBER: str(next_member)}
    body: dict[str, Any] = {
        "metadata": {
            "name": "digits",
            "namespace": "ns",
            "uid": "uid-1",
            "generation": generation,
            "annotations": annotations,
        },
        "spec": {
            "federation": "mnist",
            "image": "chaos-train:0.1.0",
            "entry": "chaos_worker.examples.digits:factory",
            "globalBatch": 32,
            "seed": 7,
            "replicas": replicas,
            "minReplicas": 0,
            "maxReplicas": 8,
            "resources": resources or {},
        },
    }
    if status is not None:
        body["status"] = status
    return ChaosJob.model_validate(body)


def observed(pod: dict[str, Any], phase: str = "Pending", uid: str = "") -> ObservedPod:
    """The reconcile's view of a pod it planned, in `phase` (ready while Running)."""
    meta = pod["metadata"]
    return ObservedPod(
        name=meta["name"],
        phase=phase,
        labels=dict(meta["labels"]),
        annotations=dict(meta["annotations"]),
        ready=phase == "Running",
        uid=uid,
    )


def config_of(pod: dict[str, Any] | ObservedPod) -> dict[str, Any]:
    annotations = (
        pod.annotations if isinstance(pod, ObservedPod) else pod["metadata"]["annotations"]
    )
    return json.loads(annotations[ANN_CONFIG])


class World:
    """A job and its pods; `step()` reconciles and applies the plan like the handlers do."""

    def __init__(self, replicas: int = 3, options: Options = Options()) -> None:  # noqa: B008
        self.job = make_job(replicas)
        self.pods: dict[str, ObservedPod] = {}
        self.options = options
        self.ever: list[str] = []
        self.now = NOW

    def step(self) -> PodPlan:
        self.now += timedelta(seconds=1)
        plan = reconcile(self.job, list(self.pods.values()), now=self.now, options=self.options)
        body = self.job.model_dump(by_alias=True, mode="json")
        body["metadata"]["annotations"][ANN_NEXT_MEMBER] = str(plan.next_member)
        body["status"] = plan.status
        self.job = ChaosJob.model_validate(body)
        for name in plan.delete:
            self.pods.pop(name, None)
        for pod in plan.create:
            name = pod["metadata"]["name"]
            assert name not in self.ever, f"member id {name} reused"
            self.ever.append(name)
            self.pods[name] = observed(pod)
        return plan

    def run_all(self) -> None:
        for name, pod in self.pods.items():
            if pod.live:
                self.pods[name] = replace(pod, phase="Running", ready=True)

    def scale(self, replicas: int) -> None:
        body = self.job.model_dump(by_alias=True, mode="json")
        body["spec"]["replicas"] = replicas
        body["metadata"]["generation"] += 1
        self.job = ChaosJob.model_validate(body)

    def live(self) -> list[ObservedPod]:
        return [p for p in self.pods.values() if p.live]


# ---------------------------------------------------------------------------- creation


def test_creation_starts_an_initial_set_with_the_same_members() -> None:
    plan = reconcile(make_job(3), [], now=NOW)
    assert [p["metadata"]["name"] for p in plan.create] == ["digits-w0", "digits-w1", "digits-w2"]
    assert plan.delete == []
    assert plan.next_member == 3
    configs = [config_of(p) for p in plan.create]
    assert all("join" not in c for c in configs)
    assert all(c["members"] == configs[0]["members"] for c in configs)
    assert set(configs[0]["members"]) == {"digits-w0", "digits-w1", "digits-w2"}
    for config in configs:
        assert config["members"][config["id"]] == config["listen"]
        WorkerConfig.model_validate(config)  # what `chaos worker` will read
        assert (config["entry"], config["seed"], config["global_batch"]) == (
            "chaos_worker.examples.digits:factory",
            7,
            32,
        )
    assert len({c["listen"] for c in configs}) == 3


def test_pods_are_owned_labelled_and_have_two_containers_sharing_memory() -> None:
    resources = {"requests": {"cpu": "500m"}, "limits": {"memory": "2Gi"}}
    pod = reconcile(make_job(1, resources=resources), [], now=NOW).create[0]
    meta = pod["metadata"]
    assert meta["labels"][LABEL_JOB] == "digits"
    assert meta["labels"][LABEL_MEMBER] == "digits-w0"
    assert meta["annotations"][ANN_ORDINAL] == "0"
    (owner,) = meta["ownerReferences"]
    assert owner == {
        "apiVersion": "chaos.training.dev/v1alpha1",
        "kind": "ChaosJob",
        "name": "digits",
        "uid": "uid-1",
        "controller": True,
        "blockOwnerDeletion": True,
    }
    spec = pod["spec"]
    assert spec["restartPolicy"] == "Never"  # a restarted trainer would reuse its member id
    trainer, replicator = spec["containers"]
    assert trainer["command"] == ["chaos", "worker", "--config", "/etc/chaos/config.json"]
    assert trainer["image"] == replicator["image"] == "chaos-train:0.1.0"
    assert trainer["resources"] == resources
    assert replicator["command"][:5] == ["chaos", "replicator", "--id", "digits-w0", "--dir"]
    assert replicator["command"][5] == "/snapshots"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["snapshots"]["emptyDir"] == {"medium": "Memory"}
    assert {"name": "snapshots", "mountPath": "/snapshots"} in trainer["volumeMounts"]
    assert {"name": "snapshots", "mountPath": "/snapshots"} in replicator["volumeMounts"]
    field = volumes["config"]["downwardAPI"]["items"][0]["fieldRef"]["fieldPath"]
    assert field == f"metadata.annotations['{ANN_CONFIG}']"
    assert config_of(pod)["snapshot_dir"] == "/snapshots"
    # the trainer advertises the sidecar, which listens two ports above it
    port = int(config_of(pod)["listen"].rpartition(":")[2])
    assert config_of(pod)["replicator_address"].endswith(f":{port + 2}")
    assert f"0.0.0.0:{port + 2}" in replicator["command"]
    assert spec["hostname"] == "digits-w0"
    assert spec["subdomain"] == "digits-workers"


def test_headless_service_selects_the_job_pods() -> None:
    service = reconcile(make_job(2), [], now=NOW).service
    assert service["metadata"]["name"] == "digits-workers"
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {LABEL_JOB: "digits"}
    assert service["metadata"]["ownerReferences"][0]["uid"] == "uid-1"


def test_addresses_are_dns_names_by_default_and_a_fixed_host_with_distinct_ports() -> None:
    pod = reconcile(make_job(1), [], now=NOW).create[0]
    assert (
        pod["metadata"]["annotations"][ANN_ADDRESS]
        == "digits-w0.digits-workers.ns.svc.cluster.local:7070"
    )
    plan = reconcile(
        make_job(4), [], now=NOW, options=Options(pod_host="127.0.0.1", base_port=9000)
    )
    ports = []
    for pod in plan.create:
        config = config_of(pod)
        host, _, port = config["listen"].rpartition(":")
        assert host == "127.0.0.1"
        ports += [
            int(port),
            config["metrics_port"],
            int(pod["spec"]["containers"][1]["command"][-1].rpartition(":")[2]),
        ]
    assert len(set(ports)) == len(ports) == 12
    assert min(ports) == 9000


# ------------------------------------------------------------------- idempotence


def test_same_input_same_plan_and_a_fixed_point_after_applying() -> None:
    world = World(3)
    pods = list(world.pods.values())
    assert reconcile(world.job, pods, now=NOW) == reconcile(world.job, pods, now=NOW)
    world.step()
    again = world.step()
    assert again.create == [] and again.delete == []
    world.run_all()
    settled = world.step()
    assert settled.create == [] and settled.delete == []
    assert settled.status["phase"] == "Running"


def test_pods_being_deleted_are_neither_counted_nor_deleted_again() -> None:
    world = World(2)
    world.step()
    world.run_all()
    name = "digits-w1"
    world.pods[name] = replace(world.pods[name], deleting=True)
    plan = world.step()
    assert plan.delete == []
    assert [p["metadata"]["name"] for p in plan.create] == ["digits-w2"]


# ---------------------------------------------------------------- lost members


def test_a_failed_pod_is_deleted_and_replaced_by_a_new_member_joining_a_live_one() -> None:
    world = World(3)
    world.step()
    world.run_all()
    world.step()
    world.pods["digits-w0"] = replace(world.pods["digits-w0"], phase="Failed")
    plan = world.step()
    assert plan.delete == ["digits-w0"]
    (new,) = plan.create
    config = config_of(new)
    assert config["id"] == "digits-w3"
    assert "members" not in config
    assert config["join"] == world.pods["digits-w1"].address
    assert plan.events["digits-w0"].reason == "MemberLost"
    assert plan.events["digits-w3"].reason == "MemberAdded"
    assert plan.status["phase"] == "Recovering"
    degraded = {c["type"]: c for c in plan.status["conditions"]}["Degraded"]
    assert (degraded["status"], degraded["reason"]) == ("True", "MemberLost")


def test_a_vanished_newest_pod_is_not_given_its_id_back() -> None:
    world = World(3)
    world.step()
    world.run_all()
    world.step()
    del world.pods["digits-w2"]  # kubectl delete pod
    plan = world.step()
    assert [p["metadata"]["name"] for p in plan.create] == ["digits-w3"]
    assert plan.status["phase"] == "Recovering"
    world.run_all()
    plan = world.step()
    assert plan.status["phase"] == "Running"
    ready = {c["type"]: c for c in plan.status["conditions"]}["Ready"]
    assert ready["status"] == "True"


def test_ids_are_never_reused_even_without_the_annotation() -> None:
    job = make_job(2)
    pods = [
        ObservedPod("digits-w5", "Running", {LABEL_MEMBER: "digits-w5"}, {ANN_ORDINAL: "5"}),
    ]
    plan = reconcile(job, pods, now=NOW)
    assert [p["metadata"]["name"] for p in plan.create] == ["digits-w6"]
    assert plan.next_member == 7


def test_joiners_prefer_the_oldest_running_member_as_seed() -> None:
    world = World(3)
    world.step()
    world.pods["digits-w1"] = replace(world.pods["digits-w1"], phase="Running")
    del world.pods["digits-w2"]
    plan = world.step()
    assert config_of(plan.create[0])["join"] == world.pods["digits-w1"].address


def test_when_every_member_is_lost_a_fresh_initial_set_starts() -> None:
    world = World(2)
    world.step()
    world.run_all()
    world.step()
    for name in list(world.pods):
        world.pods[name] = replace(world.pods[name], phase="Failed")
    plan = world.step()
    assert sorted(plan.delete) == ["digits-w0", "digits-w1"]
    configs = [config_of(p) for p in plan.create]
    assert [c["id"] for c in configs] == ["digits-w2", "digits-w3"]
    assert all(set(c["members"]) == {"digits-w2", "digits-w3"} for c in configs)


def test_a_finished_job_creates_nothing_and_keeps_its_pods() -> None:
    world = World(2)
    world.step()
    for name in list(world.pods):
        world.pods[name] = replace(world.pods[name], phase="Succeeded")
    plan = world.step()
    assert plan.create == [] and plan.delete == []
    assert plan.status["phase"] == "Succeeded"
    world.pods.clear()
    plan = world.step()  # sticky: deleting the finished pods does not restart training
    assert plan.create == [] and plan.status["phase"] == "Succeeded"


def test_members_that_all_end_well_short_of_the_last_step_are_lost_not_finished() -> None:
    world = World(2, Options(steps=50))
    world.step()
    world.run_all()
    for name in list(world.pods):
        world.pods[name] = replace(world.pods[name], phase="Succeeded")
    plan = reconcile(world.job, list(world.pods.values()), now=NOW, current_step=10,
                     options=world.options)  # fmt: skip
    assert plan.status["phase"] != "Succeeded"
    assert sorted(plan.delete) == sorted(world.pods)  # replaced, as lost members are


def test_a_member_that_exits_while_others_train_is_replaced() -> None:
    world = World(2)
    world.step()
    world.run_all()
    world.pods["digits-w0"] = replace(world.pods["digits-w0"], phase="Succeeded")
    plan = world.step()
    assert plan.delete == ["digits-w0"]
    assert [config_of(p)["join"] for p in plan.create] == [world.pods["digits-w1"].address]


# ---------------------------------------------------------------------- scaling


def test_scale_up_adds_joiners_and_scale_down_removes_the_newest() -> None:
    world = World(3)
    world.step()
    world.run_all()
    world.step()
    world.scale(5)
    plan = world.step()
    assert [config_of(p)["id"] for p in plan.create] == ["digits-w3", "digits-w4"]
    assert all(config_of(p)["join"] == world.pods["digits-w0"].address for p in plan.create)
    assert plan.status["phase"] == "Scaling"
    assert plan.status["replicas"] == 5
    world.run_all()
    assert world.step().status["phase"] == "Running"
    world.scale(2)
    plan = world.step()
    assert sorted(plan.delete) == ["digits-w2", "digits-w3", "digits-w4"]
    assert {plan.events[n].reason for n in plan.delete} == {"MemberRemoved"}
    assert plan.create == []
    assert plan.status["replicas"] == 2


def test_scale_to_zero_pauses() -> None:
    world = World(2)
    world.step()
    world.run_all()
    world.scale(0)
    plan = world.step()
    assert sorted(plan.delete) == ["digits-w0", "digits-w1"]
    assert world.step().status["phase"] == "Paused"


# ----------------------------------------------------------------------- status


def test_status_fields() -> None:
    world = World(2)
    plan = world.step()
    status = plan.status
    assert status["phase"] == "Pending"
    assert status["selector"] == "chaos.training.dev/job=digits"
    assert status["observedGeneration"] == 1
    assert status["localMembers"] == 0
    assert "currentStep" not in status
    world.run_all()
    plan = reconcile(world.job, list(world.pods.values()), now=NOW, current_step=12)
    assert plan.status["localMembers"] == 2
    assert plan.status["currentStep"] == 12
    # A scrape that saw nothing keeps the step; it never goes back.
    job = make_job(2, status=plan.status)
    assert reconcile(job, list(world.pods.values()), now=NOW).status["currentStep"] == 12
    assert (
        reconcile(job, list(world.pods.values()), now=NOW, current_step=3).status["currentStep"]
        == 12
    )
    # The status round-trips through the API model (what the CRD schema accepts).
    make_job(2, status=plan.status)


def test_condition_transition_time_only_changes_with_status() -> None:
    first = set_condition([], "Ready", "False", "MembersStarting", "0 of 2", 1, NOW)
    later = NOW + timedelta(minutes=1)
    same = set_condition(first, "Ready", "False", "MembersMissing", "1 of 2", 2, later)
    assert same[0]["lastTransitionTime"] == "2026-11-22T15:00:00Z"
    assert (same[0]["reason"], same[0]["observedGeneration"]) == ("MembersMissing", 2)
    flipped = set_condition(same, "Ready", "True", "MembersRunning", "2 of 2", 2, later)
    assert flipped[0]["lastTransitionTime"] == "2026-11-22T15:01:00Z"
    both = set_condition(flipped, "Degraded", "False", "AsExpected", "", 2, later)
    assert [c["type"] for c in both] == ["Degraded", "Ready"]


# -------------------------------------------------------------------- properties

actions = st.lists(
    st.one_of(
        st.tuples(st.just("scale"), st.integers(0, 6)),
        st.tuples(st.just("fail"), st.integers(0, 20)),
        st.tuples(st.just("vanish"), st.integers(0, 20)),
        st.tuples(st.just("exit"), st.integers(0, 20)),
        st.tuples(st.just("run"), st.just(0)),
        st.tuples(st.just("reconcile"), st.just(0)),
    ),
    max_size=25,
)


@settings(max_examples=200, deadline=None)
@given(replicas=st.integers(0, 5), script=actions)
def test_any_history_converges_without_reusing_ids(replicas: int, script: list) -> None:
    world = World(replicas)
    for action, arg in script:
        names = sorted(world.pods)
        if action == "scale":
            world.scale(arg)
        elif action == "run":
            world.run_all()
        elif action == "reconcile":
            world.step()
        elif names:
            name = names[arg % len(names)]
            if action == "vanish":
                del world.pods[name]
            else:
                phase = "Failed" if action == "fail" else "Succeeded"
                world.pods[name] = replace(world.pods[name], phase=phase)
        if world.job.status and world.job.status.phase == "Succeeded":
            return  # every member finished: nothing to converge to
    plan = world.step()
    if plan.status["phase"] == "Succeeded":
        assert plan.create == []
        return
    live = world.live()
    assert len(live) == world.job.spec.replicas
    for pod in plan.create:
        config = WorkerConfig.model_validate(config_of(pod))
        if config.join:
            assert config.join in {p.address for p in live}
            assert config.join not in {config_of(p)["listen"] for p in plan.create}
        else:
            assert set(config.members) == {config_of(p)["id"] for p in plan.create}
    again = world.step()
    assert again.create == [] and again.delete == []
    assert len({config_of(p)["listen"] for p in live}) == len(live)


def test_members_that_end_after_the_last_step_are_finishing_not_lost() -> None:
    world = World(3, Options(steps=50))
    world.step()
    world.run_all()
    world.step()
    first = next(iter(world.pods))
    world.pods[first] = replace(world.pods[first], phase="Succeeded")
    # Before the last step an exit is a lost member; at the last step the others follow.
    early = reconcile(world.job, list(world.pods.values()), now=NOW, current_step=48,
                      options=world.options)  # fmt: skip
    assert early.delete == [first] and len(early.create) == 1
    done = reconcile(world.job, list(world.pods.values()), now=NOW, current_step=49,
                     options=world.options)  # fmt: skip
    assert done.create == [] and done.delete == []
    assert done.status["phase"] == "Running"
    assert {c["type"]: c["reason"] for c in done.status["conditions"]} == {
        "Degraded": "TrainingFinished",
        "Ready": "TrainingFinished",
    }
    for name in world.pods:
        world.pods[name] = replace(world.pods[name], phase="Succeeded")
    assert reconcile(world.job, list(world.pods.values()), now=NOW).status["phase"] == "Succeeded"
