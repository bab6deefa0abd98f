"""The operator's part of durable checkpoints (#18): `spec.checkpoints`, one writer per party,
the resume after every member was lost, and what the status says of the checkpoints."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest
from chaos_operator.api import ChaosJob
from chaos_operator.durable import DurableReading, durable_status
from chaos_operator.kube import observe_pod
from chaos_operator.pods import ANN_CONFIG
from chaos_operator.reconcile import ObservedPod, PodPlan, reconcile
from chaos_operator.scrape import durable_reading, parse_metrics
from chaos_worker.config import WorkerConfig
from chaos_worker.telemetry.metrics import WorkerMetrics
from kubernetes import client
from pydantic import ValidationError

from tests.unit.test_jobspec import NOW, advance, condition, make_job, running
from tests.unit.test_reconcile import observed

pytestmark = pytest.mark.unit

CLAIM = {"claimName": "ckpt", "everySteps": 20, "everySeconds": 60, "keep": 2}


def config(pod: dict[str, Any] | ObservedPod) -> WorkerConfig:
    annotations = (
        pod.annotations if isinstance(pod, ObservedPod) else pod["metadata"]["annotations"]
    )
    return WorkerConfig.model_validate_json(annotations[ANN_CONFIG])


def writers(plan: PodPlan) -> list[str]:
    return [p["metadata"]["name"] for p in plan.create if config(p).checkpoint_dir]


def checkpoint_volume(pod: dict[str, Any]) -> dict[str, Any] | None:
    return next((v for v in pod["spec"]["volumes"] if v["name"] == "checkpoints"), None)


# ------------------------------------------------------------------------------ the API


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ({}, "either claimName"),
        ({"claimName": "a", "size": "1Gi"}, "either claimName"),
        ({"storageClassName": "fast", "claimName": "a"}, "storageClassName"),
        ({"size": "lots"}, "resource quantity"),
        ({"claimName": "Not_A_Name"}, "pattern"),
        ({"claimName": "a", "keep": 0}, "greater than or equal to 1"),
        ({"claimName": "a", "everySteps": -1}, "greater than or equal to 0"),
        ({"claimName": "a", "everySeconds": 0}, "greater than or equal to 1"),
    ],
)
def test_bad_checkpoint_policies_are_refused(policy: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        make_job(checkpoints=policy)


def test_defaults_are_every_100_steps_keeping_3() -> None:
    policy = make_job(checkpoints={"size": "1Gi"}).spec.checkpoints
    assert policy is not None
    assert (policy.every_steps, policy.every_seconds, policy.keep) == (100, None, 3)


# --------------------------------------------------------------------- one writer


def test_one_member_mounts_the_claim_and_writes_with_the_spec_intervals() -> None:
    plan = reconcile(make_job(replicas=3, checkpoints=CLAIM), [], now=NOW)
    assert writers(plan) == ["digits-w0"]
    pods = {p["metadata"]["name"]: p for p in plan.create}
    writer = config(pods["digits-w0"])
    assert writer.checkpoint_dir == "/checkpoints" and writer.checkpoint_writer == "self"
    assert (writer.checkpoint_every_steps, writer.checkpoint_every_s) == (20, 60.0)
    assert writer.checkpoint_keep == 2 and writer.resume_from is None  # a new job: step 0
    assert checkpoint_volume(pods["digits-w0"]) == {
        "name": "checkpoints",
        "persistentVolumeClaim": {"claimName": "ckpt"},
    }
    trainer = pods["digits-w0"]["spec"]["containers"][0]
    assert {"name": "checkpoints", "mountPath": "/checkpoints"} in trainer["volumeMounts"]
    for other in ("digits-w1", "digits-w2"):
        assert checkpoint_volume(pods[other]) is None
        assert config(pods[other]).checkpoint_dir is None
    assert plan.claim is None  # an existing claim: nothing to create


def test_without_checkpoints_no_member_writes_and_no_claim() -> None:
    plan = reconcile(make_job(replicas=2), [], now=NOW)
    assert writers(plan) == [] and plan.claim is None
    assert "durableStep" not in plan.status and "resumedFrom" not in plan.status


def test_a_sized_policy_makes_the_operator_create_an_owned_claim() -> None:
    job = make_job(checkpoints={"size": "5Gi", "storageClassName": "fast"})
    plan = reconcile(job, [], now=NOW)
    claim = plan.claim
    assert claim is not None and claim["metadata"]["name"] == "digits-checkpoints"
    assert claim["spec"] == {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": "5Gi"}},
        "storageClassName": "fast",
    }
    assert claim["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert checkpoint_volume(plan.create[0])["persistentVolumeClaim"] == {
        "claimName": "digits-checkpoints"
    }


def test_a_lost_writer_is_replaced_by_a_new_writer_joining_the_others() -> None:
    job = make_job(replicas=3, checkpoints=CLAIM)
    plan = reconcile(job, [], now=NOW)
    pods = running(plan)
    lost = [replace(pods[0], phase="Failed"), *pods[1:]]
    again = reconcile(advance(job, plan), lost, now=NOW)
    assert again.delete == ["digits-w0"] and writers(again) == ["digits-w3"]
    newcomer = config(again.create[0])
    assert newcomer.join and newcomer.resume_from is None  # it pulls the state, resumes nothing
    # a lost member that was not the writer is replaced by a member that does not write
    lost = [pods[0], replace(pods[1], phase="Failed"), pods[2]]
    assert writers(reconcile(advance(job, plan), lost, now=NOW)) == []


def test_scaling_down_keeps_the_writer_until_every_member_goes() -> None:
    job = make_job(replicas=2, checkpoints=CLAIM)
    plan = reconcile(job, [], now=NOW)
    pods = running(plan)
    # w0 was lost and w2 took over writing: w2 is now the newest, yet w1 goes first
    pods = [pods[1], observed(reconcile(advance(job, plan), [pods[1]], now=NOW).create[0])]
    pods = [replace(p, phase="Running") for p in pods]
    assert [p.writer for p in pods] == [False, True]
    down = reconcile(advance(job, plan, replicas=1), pods, now=NOW)
    assert down.delete == ["digits-w1"]
    zero = reconcile(advance(job, plan, replicas=0), pods, now=NOW)
    assert sorted(zero.delete) == ["digits-w1", "digits-w2"]


# --------------------------------------------------------------------------- resume


def lose_everything(replicas: int = 3) -> tuple[ChaosJob, PodPlan]:
    """A job that trained (a checkpoint of step 40, step 57 done), then scaled to 0 and
    back: the plan of the reconcile that brings members back."""
    job = make_job(replicas=replicas, checkpoints=CLAIM)
    first = reconcile(job, [], now=NOW)
    trained = reconcile(advance(job, first), running(first), now=NOW, current_step=57,
                        durable=DurableReading(checkpoint_step=40))  # fmt: skip
    assert trained.status["currentStep"] == 57 and trained.status["durableStep"] == 40
    paused = reconcile(advance(job, trained, replicas=0), [], now=NOW)
    assert paused.status["currentStep"] == 57  # what the job did stays true while paused
    job = advance(job, paused, replicas=replicas)
    return job, reconcile(job, [], now=NOW)


def test_after_every_member_was_lost_the_writer_alone_resumes_and_the_others_join_it() -> None:
    _, plan = lose_everything()
    names = [p["metadata"]["name"] for p in plan.create]
    assert names == ["digits-w3", "digits-w4", "digits-w5"] and writers(plan) == ["digits-w3"]
    writer, *others = [config(p) for p in plan.create]
    assert list(writer.members) == ["digits-w3"]  # an initial set of one
    assert writer.resume_from == "/checkpoints" and writer.resume_required is False
    for other in others:
        assert not other.members and other.join == writer.listen and other.resume_from is None
    assert "resumes from the newest checkpoint on claim ckpt" in plan.events["digits-w3"].message
    assert "joins through digits-w3" in plan.events["digits-w4"].message
    status = plan.status
    assert "currentStep" not in status  # unknown until the resumed members report
    assert status["durableStep"] == 40  # still the newest known
    assert status["resumedFrom"] == {"claimName": "ckpt", "time": "2026-11-22T15:00:00Z"}


def test_a_fresh_initial_set_without_checkpoints_also_restarts_the_current_step() -> None:
    job = make_job(replicas=2)
    first = reconcile(job, [], now=NOW)
    trained = reconcile(advance(job, first), running(first), now=NOW, current_step=30)
    again = reconcile(advance(job, trained), [], now=NOW)  # every pod vanished
    assert len(again.create) == 2 and "currentStep" not in again.status
    assert all(config(p).resume_from is None for p in again.create)
    on = reconcile(advance(job, again), running(again), now=NOW, current_step=3)
    assert on.status["currentStep"] == 3  # not the 30 of the lost run


def test_the_resumed_step_becomes_the_truth_and_a_skipped_checkpoint_a_warning() -> None:
    job, plan = lose_everything()
    pods = running(plan)
    skipped = ("step-00000040: state.safetensors: SHA-256 differs from the manifest's",)
    reading = DurableReading(checkpoint_step=20, resumed_step=20, skipped=skipped)
    seen = reconcile(advance(job, plan), pods, now=NOW, current_step=19, durable=reading)
    status = seen.status
    assert status["currentStep"] == 19  # from the checkpoint of step 20 on, not 57
    assert status["durableStep"] == 20  # the newest that verifies, not the corrupt 40
    assert status["resumedFrom"]["step"] == 20
    assert status["resumedFrom"]["path"] == "step-00000020"
    assert status["resumedFrom"]["skipped"] == list(skipped)
    events = {e.reason: e for e in seen.job_events}
    assert events["CheckpointSkipped"].type == "Warning"
    assert (
        "step-00000040: state.safetensors: SHA-256 differs" in events["CheckpointSkipped"].message
    )
    assert "resumed from step-00000020 on claim ckpt" in events["ResumedFromCheckpoint"].message
    ChaosJob.model_validate({**job.to_k8s(), "status": status})  # the schema takes it
    # the next reconcile posts nothing again; new checkpoints raise durableStep
    job = advance(job, seen)
    reading = DurableReading(checkpoint_step=30, resumed_step=20, skipped=skipped)
    later = reconcile(job, pods, now=NOW, current_step=33, durable=reading)
    assert later.job_events == [] and later.status["durableStep"] == 30
    assert later.status["currentStep"] == 33


def test_a_claim_without_a_sound_checkpoint_starts_afresh_with_a_warning() -> None:
    job, plan = lose_everything()
    reading = DurableReading(resumed_step=0)
    seen = reconcile(advance(job, plan), running(plan), now=NOW, durable=reading)
    assert seen.status["resumedFrom"]["step"] == 0 and "path" not in seen.status["resumedFrom"]
    assert "durableStep" not in seen.status
    (event,) = seen.job_events
    assert (event.reason, event.type) == ("NoCheckpoint", "Warning")


def test_success_records_the_final_checkpoint_from_the_writers_termination_message() -> None:
    job = make_job(replicas=2, steps=50, checkpoints=CLAIM)
    plan = reconcile(job, [], now=NOW)
    ended = [replace(p, phase="Succeeded", final_step=49) for p in running(plan)]
    ended[0] = replace(ended[0], final_checkpoint=50)  # the writer
    done = reconcile(advance(job, plan), ended, now=NOW)
    assert done.status["phase"] == "Succeeded"
    assert done.status["finalCheckpoint"] == {
        "claimName": "ckpt",
        "path": "step-00000050",
        "step": 50,
    }
    assert condition(done, "Complete") == ("True", "TrainingFinished")
    # sticky: once the pods are gone it is still there
    assert reconcile(advance(job, done), [], now=NOW).status["finalCheckpoint"]["step"] == 50


def test_durable_status_only_grows_between_resumes() -> None:
    previous = {"durableStep": 60}
    out, events = durable_status(previous, DurableReading(checkpoint_step=40), claim="c",
                                 restarted=False, succeeded=False, steps=100, now=NOW)  # fmt: skip
    assert out == {"durableStep": 60} and events == []


# --------------------------------------------------------------- what workers say


def test_the_worker_metrics_reach_the_operators_reading() -> None:
    metrics = WorkerMetrics("digits-w3")
    untouched = parse_metrics(metrics.render().decode(), 0.0)
    assert (untouched.checkpoint_step, untouched.resumed_step, untouched.skipped) == (
        None,
        None,
        (),
    )
    metrics.observe_resumed(20, ["step-00000040: state.safetensors: SHA-256 differs"])
    metrics.checkpoint_step.set(30)
    writer = parse_metrics(metrics.render().decode(), 1.0)
    assert writer.checkpoint_step == 30 and writer.resumed_step == 20 and writer.step == 19
    assert writer.skipped == ("step-00000040: state.safetensors: SHA-256 differs",)
    other = parse_metrics(WorkerMetrics("digits-w4").render().decode(), 1.0)
    assert durable_reading([other, writer]) == DurableReading(30, 20, writer.skipped)
    assert durable_reading([other]) == DurableReading()


def test_the_termination_message_names_the_checkpoint() -> None:
    def pod(message: str) -> client.V1Pod:
        ended = client.V1ContainerStateTerminated(exit_code=0, message=message)
        state = client.V1ContainerState(terminated=ended)
        status = client.V1ContainerStatus(name="trainer", image="i", image_id="", ready=False,
                                          restart_count=0, state=state)  # fmt: skip
        return client.V1Pod(
            metadata=client.V1ObjectMeta(name="digits-w0"),
            status=client.V1PodStatus(phase="Succeeded", container_statuses=[status]),
        )

    seen = observe_pod(pod(json.dumps({"step": 49, "checkpoint": 50})))
    assert (seen.final_step, seen.final_checkpoint) == (49, 50)
    assert observe_pod(pod('{"step": 9}')).final_checkpoint is None
    assert observe_pod(pod('{"step": 9, "checkpoint": true}')).final_checkpoint is None
    assert observe_pod(pod("[1]")).final_step is None
