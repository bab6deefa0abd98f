"""The operator's side of autoscaling: parsing member scrapes, measuring goodput, capacity,
and the status it writes (`chaos_operator.scrape`, `chaos_operator.autoscaler`)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from chaos_operator.autoscaler import condition_of, pods_in_flux, quota_headroom, status_block
from chaos_operator.kube import observe_pod
from chaos_operator.reconcile import reconcile
from chaos_operator.scrape import (
    MemberMetrics,
    latest_step,
    measure_goodput,
    parse_metrics,
    scale_out_delay,
    view_settled,
)
from chaos_planner import ScaleDecision
from chaos_worker.telemetry.metrics import WorkerMetrics
from kubernetes import client

from tests.unit.test_reconcile import NOW, World, make_job

pytestmark = pytest.mark.unit


def exposition(steps: int, members: int, joined_s: float | None = None) -> str:
    """What a real worker serves after `steps` steps of 8 samples in a view of `members`."""
    metrics = WorkerMetrics("digits-w0")
    for step in range(steps):
        metrics.observe_step(0.1, 0.5, samples=8, members=members, step=step)
    if joined_s is not None:
        metrics.observe_scale_out(joined_s)
    return metrics.render().decode()


def test_parse_a_workers_exposition() -> None:
    m = parse_metrics(exposition(5, 3, joined_s=2.5), at=7.0)
    assert m == MemberMetrics(at=7.0, step=4, samples_total=40.0, members=3,
                              scale_out_sum=2.5, scale_out_count=1.0)  # fmt: skip
    fresh = parse_metrics(exposition(0, 0), at=1.0)
    assert (fresh.step, fresh.samples_total, fresh.members, fresh.scale_out_count) == (0, 0, 0, 0)
    assert parse_metrics("", at=0.0).samples_total is None
    with pytest.raises(ValueError):
        parse_metrics("this is not {metrics", at=0.0)


def test_step_and_scale_out_delay_of_the_newest_joiner() -> None:
    scrapes = {
        "j-w0": MemberMetrics(at=0, step=9),
        "j-w3": MemberMetrics(at=0, step=11, scale_out_sum=3.0, scale_out_count=1),
        "j-w5": MemberMetrics(at=0, step=10, scale_out_sum=9.0, scale_out_count=2),
        "j-w6": MemberMetrics(at=0, step=None),  # still joining: nothing observed yet
    }
    assert latest_step(scrapes.values()) == 11
    assert latest_step([]) is None
    assert scale_out_delay(scrapes, ["j-w6", "j-w5", "j-w3", "j-w0"]) == 4.5
    assert scale_out_delay(scrapes, ["j-w0"]) is None


def reading(at: float, samples: float, members: int | None = 2) -> MemberMetrics:
    return MemberMetrics(at=at, samples_total=samples, members=members)


def test_goodput_is_the_sum_of_member_rates_between_two_scrapes() -> None:
    before = {"a": reading(0.0, 100.0), "b": reading(0.5, 100.0)}
    after = {"a": reading(10.0, 300.0), "b": reading(10.5, 400.0)}
    assert measure_goodput(before, after, {"a", "b"}) == pytest.approx(20.0 + 30.0)


@pytest.mark.parametrize(
    "after",
    [
        {"a": reading(10.0, 300.0)},  # b did not answer
        {"a": reading(10.0, 300.0), "b": reading(10.5, 400.0, members=3)},  # the view changed
        {"a": reading(10.0, 300.0), "b": reading(10.5, 50.0)},  # b restarted
        {"a": reading(10.0, 300.0), "b": reading(0.5, 100.0)},  # b not scraped again
    ],
)
def test_no_goodput_from_an_unclean_pair(after: dict[str, MemberMetrics]) -> None:
    before = {"a": reading(0.0, 100.0), "b": reading(0.5, 100.0)}
    assert measure_goodput(before, after, {"a", "b"}) is None


def test_a_joining_member_unsettles_the_view() -> None:
    joined = [reading(0, 1, members=2), reading(0, 1, members=2)]
    assert view_settled(joined, 2)
    assert not view_settled([*joined, reading(0, 0, members=0)], 3)  # an observer
    assert not view_settled([*joined, None], 2)
    assert view_settled([reading(0, 1, members=5)], 1)  # other parties' members count too
    assert measure_goodput({}, {}, set()) is None


def test_quota_headroom_in_pods() -> None:
    requests, limits = {"cpu": "500m", "memory": "1Gi"}, {"memory": "2Gi", "nvidia.com/gpu": 1}
    assert quota_headroom([], requests, limits) is None
    assert quota_headroom([({"services": "3"}, {"services": "0"})], requests, limits) is None
    quotas = [
        ({"pods": "10", "requests.cpu": "4"}, {"pods": "3", "requests.cpu": "2600m"}),
        ({"limits.memory": "9Gi", "requests.nvidia.com/gpu": "4"}, {"limits.memory": "2Gi"}),
    ]
    # cpu: 1.4 left / 0.5 = 2; memory: 7Gi / 2Gi = 3; gpu (requests default to limits): 4
    assert quota_headroom(quotas, requests, limits) == 2
    full = [({"count/pods": "3"}, {"count/pods": "4"})]
    assert quota_headroom(full, requests, limits) == 0
    assert quota_headroom([({"cpu": "8"}, {})], {}, {}) is None  # a pod without cpu requests


def pod(name: str, phase: str, *, unschedulable: bool = False, deleting: bool = False):
    conditions = (
        [client.V1PodCondition(type="PodScheduled", status="False", reason="Unschedulable")]
        if unschedulable
        else None
    )
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, deletion_timestamp=NOW if deleting else None),
        status=client.V1PodStatus(phase=phase, conditions=conditions),
    )


def in_flux(*pods: client.V1Pod) -> tuple[bool, bool]:
    return pods_in_flux([observe_pod(p) for p in pods])


def test_pending_and_unschedulable_pods() -> None:
    assert in_flux(pod("a", "Running")) == (False, False)
    assert in_flux(pod("a", "Running"), pod("b", "Pending")) == (True, False)
    assert in_flux(pod("b", "Pending", unschedulable=True)) == (True, True)
    assert in_flux(pod("b", "Pending", unschedulable=True, deleting=True)) == (False, False)


def test_status_block_moves_the_decision_time_only_on_a_change() -> None:
    up = ScaleDecision(replicas=3, reason="GoodputAboveTarget", message="m", goodput=40.123456,
                  marginal=15.0)  # fmt: skip
    block = status_block({}, up, NOW, changed=True)
    assert block == {
        "desiredReplicas": 3,
        "reason": "GoodputAboveTarget",
        "message": "m",
        "lastDecisionTime": "2026-11-22T15:00:00Z",
        "goodputSamplesPerSecond": 40.123,
        "marginalGoodputSamplesPerSecond": 15.0,
    }
    wait = ScaleDecision(replicas=3, reason="Cooldown", message="w")
    later = status_block(block, wait, NOW + timedelta(seconds=30), changed=False)
    assert later["lastDecisionTime"] == "2026-11-22T15:00:00Z"
    assert "lastDecisionTime" not in status_block({}, wait, NOW, changed=False)
    assert condition_of(wait)[0] == "True"
    assert condition_of(ScaleDecision(replicas=1, reason="Measuring", message="x"))[0] == "False"


def test_reconcile_keeps_the_autoscaler_status_and_writes_the_scale_out_delay() -> None:
    world = World(2)
    world.step()
    world.run_all()
    status = dict(world.step().status)
    status["autoscaling"] = {"desiredReplicas": 2, "reason": "OnTarget", "message": "m"}
    job = make_job(2, status=status)  # the status round-trips through the API model
    plan = reconcile(job, list(world.pods.values()), now=NOW, scale_out_delay_s=1.23456)
    assert plan.status["autoscaling"] == status["autoscaling"]
    assert plan.status["lastScaleOutDelaySeconds"] == 1.235
    again = reconcile(make_job(2, status=plan.status), list(world.pods.values()), now=NOW)
    assert again.status["lastScaleOutDelaySeconds"] == 1.235
