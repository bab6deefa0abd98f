"""Durable checkpoints on a real API server (#18): one writer per party on a claim, a job
that finishes records its final checkpoint, and a job scaled to 0 and back resumes from the
newest checkpoint that verifies (a corrupt newer one skipped, with a Warning Event) and goes
on from its step, not from step 0.

The pod runner maps a claim to `<workdir>/pods/claims/<claim name>`, shared by the pods that
mount it and kept after them, as a volume outlives its pods."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from chaos_worker.replication.checkpoint import verify

from tests.controlplane.operatorrun import JobView, OperatorRun, run_operator
from tests.controlplane.test_jobspec_e2e import manifest, patch_spec, plane_with_namespace

pytestmark = pytest.mark.controlplane

STATE_LIMIT = 1 << 30


def checkpoints(claim: Path) -> list[Path]:
    """The complete checkpoints on a claim, oldest first."""
    found = claim.glob("step-*") if claim.is_dir() else []
    return sorted(p for p in found if (p / "manifest.json").exists())


def writers(job: JobView) -> set[str]:
    """The pods that mount the checkpoint claim."""
    return {
        name
        for name, pod in job.pods().items()
        if any(v.get("persistentVolumeClaim") for v in pod["spec"]["volumes"])
    }


def config_of(pod: dict) -> dict:
    return json.loads(pod["metadata"]["annotations"]["chaos.training.dev/config"])


def metric(job: JobView, pod: str, name: str) -> float | None:
    samples = job.samples_of(job.pods()[pod], name)
    return samples[0][1] if samples else None


def finish_with_a_final_checkpoint(run: OperatorRun, plane, ns: str, claims: Path) -> None:
    """A job on an existing claim trains its 30 steps: its final checkpoint is in the status
    and on the claim, and it verifies."""
    claim = {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
             "metadata": {"name": "team-ckpt", "namespace": ns},
             "spec": {"accessModes": ["ReadWriteOnce"],
                      "resources": {"requests": {"storage": "1Gi"}}}}  # fmt: skip
    plane.apply(claim)
    job = JobView(plane, ns, "short")
    policy = {"claimName": "team-ckpt", "everySteps": 10}
    plane.apply(manifest("short", ns, steps=30, checkpoints=policy))
    run.expect(lambda: job.status().get("phase") == "Succeeded", "short: phase Succeeded")
    assert writers(job) == {"short-w0"}
    status = job.status()
    assert status["finalCheckpoint"] == {
        "claimName": "team-ckpt",
        "path": "step-00000030",
        "step": 30,
    }, status
    assert status["durableStep"] == 30
    manifest_, _ = verify(claims / "team-ckpt" / "step-00000030", STATE_LIMIT)
    assert manifest_.final and manifest_.step == 30
    assert [p.name for p in checkpoints(claims / "team-ckpt")] == [
        "step-00000010",
        "step-00000020",
        "step-00000030",
    ]


def test_checkpoints_on_a_claim_finish_and_resume(control_plane_factory, tmp_path: Path) -> None:
    plane, ns = plane_with_namespace(control_plane_factory, "/checkpoints")
    claims = tmp_path / "pods" / "claims"
    for policy, message in [
        ({"claimName": "a", "size": "1Gi"}, "give either claimName"),
        ({"storageClassName": "fast", "claimName": "a"}, "give size with it"),
        ({"size": "1Gi", "keep": 0}, "spec.checkpoints.keep"),
    ]:
        bad = manifest("bad", ns, checkpoints=policy)
        refused = plane.kubectl("create", "-f", "-", input=json.dumps(bad), check=False)
        assert refused.returncode != 0 and message in refused.stderr, (policy, refused.stderr)
    with run_operator(plane, ns, tmp_path) as run:
        finish_with_a_final_checkpoint(run, plane, ns, claims)

        # A long job on a claim the operator creates; one member of the two writes.
        job = JobView(plane, ns, "long")
        policy = {"size": "1Gi", "everySteps": 10, "keep": 3}
        plane.apply(manifest("long", ns, minReplicas=0, checkpoints=policy))
        run.expect(lambda: job.running() == {"long-w0", "long-w1"}, "2 pods")
        claim = plane.get("persistentvolumeclaim", "long-checkpoints", ns)
        assert claim["spec"]["resources"]["requests"]["storage"] == "1Gi"
        assert claim["metadata"]["ownerReferences"][0]["name"] == "long"
        assert writers(job) == {"long-w0"}
        pods = job.pods()
        assert config_of(pods["long-w0"])["checkpoint_writer"] == "self"
        assert "checkpoint_dir" not in config_of(pods["long-w1"])
        run.expect(lambda: job.status().get("durableStep", 0) >= 10, "a checkpoint")

        # The writer is lost: its replacement joins (the view's root is not it) and writes.
        plane.kubectl("delete", "pod", "long-w0", "-n", ns, "--wait=false")
        run.expect(lambda: job.running() == {"long-w1", "long-w2"}, "a new writer")
        assert writers(job) == {"long-w2"} and config_of(job.pods()["long-w2"])["join"]
        run.expect(lambda: (metric(job, "long-w2", "chaos_checkpoint_step") or -1) > 0,
                   "the new writer writes")  # fmt: skip
        run.expect(lambda: job.status().get("durableStep", 0) >= 30, "three checkpoints")

        # Every member goes (scale to 0); the newest checkpoint is then corrupted.
        patch_spec(plane, ns, "long", replicas=0)
        run.expect(lambda: not job.pods() and not run.runner.alive(), "every member gone")
        run.expect(lambda: job.status().get("phase") == "Paused", "phase Paused")
        on_disk = checkpoints(claims / "long-checkpoints")
        assert len(on_disk) == 3, on_disk
        corrupt, sound = on_disk[-1], on_disk[-2]
        state = corrupt / "state.safetensors"
        data = bytearray(state.read_bytes())
        data[-1] ^= 0xFF
        state.write_bytes(bytes(data))
        resume_at = int(sound.name.removeprefix("step-"))

        # Back to 2: the new writer alone resumes from the sound one, the other joins it.
        patch_spec(plane, ns, "long", replicas=2)
        run.expect(lambda: job.running() == {"long-w3", "long-w4"}, "2 new pods")
        pods = job.pods()
        assert writers(job) == {"long-w3"}
        resumed = config_of(pods["long-w3"])
        assert list(resumed["members"]) == ["long-w3"] and resumed["resume_from"]
        assert config_of(pods["long-w4"])["join"] == resumed["listen"]
        run.expect(lambda: "step" in job.status().get("resumedFrom", {}), "resumedFrom reported")
        status = job.status()
        assert status["resumedFrom"]["step"] == resume_at, status["resumedFrom"]
        assert status["resumedFrom"]["path"] == sound.name
        (skipped,) = status["resumedFrom"]["skipped"]
        assert skipped.startswith(f"{corrupt.name}: state.safetensors: SHA-256 differs"), skipped
        events = {e["reason"]: e for e in job.event_list()}
        assert events["CheckpointSkipped"]["type"] == "Warning"
        assert corrupt.name in events["CheckpointSkipped"]["message"]
        assert f"resumed from {sound.name}" in events["ResumedFromCheckpoint"]["message"]
        assert metric(job, "long-w3", "chaos_checkpoint_resumed_step") == resume_at

        # It goes on from the checkpoint's step: the writer trained only the steps after it,
        # the newcomer joined and trains, and the job's step is past the checkpoint.
        run.expect(lambda: job.step() >= resume_at + 20, "training after the resume")
        run.expect(lambda: job.steps_of(job.pods()["long-w4"]) > 0, "the newcomer trains")
        trained_here = job.steps_of(job.pods()["long-w3"])  # steps it computed itself
        last = metric(job, "long-w3", "chaos_train_step")  # read after: only later
        assert last is not None and 0 < trained_here <= last - resume_at + 1, (trained_here, last)
        assert job.status()["durableStep"] > resume_at  # new checkpoints go on
        assert run.process.poll() is None, run.diagnose()
