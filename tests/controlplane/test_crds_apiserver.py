"""The generated CRDs on a real kube-apiserver: structural schema accepted, defaults applied,
CEL rules and patterns enforced with messages that name the field, explain, scale, status."""

from __future__ import annotations

import json
import secrets
import subprocess
from typing import Any

import pytest
from chaos_operator.api import ChaosJob, ChaosPeer
from pydantic import ValidationError

from tests.controlplane.plane import ControlPlane, poll

pytestmark = pytest.mark.controlplane

FINGERPRINT = "sha256:" + "0f" * 32
PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def job(name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    """A ChaosJob manifest; only required fields unless `spec` adds more."""
    return {
        "apiVersion": "chaos.training.dev/v1alpha1",
        "kind": "ChaosJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "federation": "mnist",
            "image": "chaos-train:0.1.0",
            "entry": "chaos_worker.examples.digits:factory",
            "globalBatch": 64,
            "maxReplicas": 4,
            **spec,
        },
    }


def peer(name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    """A ChaosPeer manifest with an endpoint and the given spec fields."""
    return {
        "apiVersion": "chaos.training.dev/v1alpha1",
        "kind": "ChaosPeer",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"party": "party-b", "endpoint": "https://chaos.party-b.example:8443", **spec},
    }


def create(plane: ControlPlane, obj: dict[str, Any], check: bool = False):
    """`kubectl create -f -` (strict server-side field validation, kubectl's default)."""
    return plane.kubectl("create", "-f", "-", input=json.dumps(obj), check=check)


def test_crds_are_established(control_plane: ControlPlane, crds: list[str]) -> None:
    assert sorted(crds) == ["chaosjobs.chaos.training.dev", "chaospeers.chaos.training.dev"]
    for name in crds:
        conditions = control_plane.get("crd", name)["status"]["conditions"]
        state = {c["type"]: c["status"] for c in conditions}
        assert state["Established"] == "True" and state["NamesAccepted"] == "True"
        # A non-structural schema would show up as this condition.
        assert state.get("NonStructuralSchema", "False") == "False"


def test_valid_job_is_accepted_and_defaulted(
    control_plane: ControlPlane, crds: list[str], namespace: str
) -> None:
    create(control_plane, job("ok", namespace), check=True)
    stored = control_plane.get("chaosjob", "ok", namespace)
    spec = stored["spec"]
    assert spec["replicas"] == 1 and spec["minReplicas"] == 1 and spec["seed"] == 0
    assert spec["autoscaling"] == {"enabled": False, "cooldownSeconds": 60}
    assert spec["resources"] == {}
    # What the API server stores is a valid model, and the model agrees on the defaults.
    assert ChaosJob.model_validate(stored).spec == ChaosJob.model_validate(job("ok", "x")).spec


def test_job_dumped_with_nulls_is_accepted(
    control_plane: ControlPlane, crds: list[str], namespace: str
) -> None:
    """A client that sends unset optional fields as null does not trip validation: the API
    server prunes nulls of non-nullable fields (why the generator emits no `nullable`)."""
    model = ChaosJob.model_validate(job("nulls", namespace, resources={"limits": {"cpu": 2}}))
    body = model.model_dump(mode="json", by_alias=True)
    assert body["status"] is None and body["spec"]["autoscaling"]["targetGoodputPerWorker"] is None
    create(control_plane, body, check=True)
    stored = control_plane.get("chaosjob", "nulls", namespace)
    assert "targetGoodputPerWorker" not in stored["spec"]["autoscaling"]
    assert stored["spec"]["resources"]["limits"] == {"cpu": 2}


INVALID_JOBS = [
    pytest.param(
        {"replicas": 5},
        "spec.replicas",
        "replicas must lie within [minReplicas, maxReplicas]",
        id="above-max",
    ),
    pytest.param(
        {"replicas": 1, "minReplicas": 2}, "spec.replicas", "must lie within", id="below-min"
    ),
    pytest.param(
        {"minReplicas": 5, "replicas": 5},
        "spec.minReplicas",
        "minReplicas must not exceed maxReplicas",
        id="min-above-max",
    ),
    pytest.param({"entry": "digits"}, "spec.entry", "should match", id="entry-no-colon"),
    pytest.param({"entry": "my-pkg:f"}, "spec.entry", "should match", id="entry-bad-module"),
    pytest.param({"globalBatch": 0}, "spec.globalBatch", "greater than or equal to 1", id="g0"),
    pytest.param(
        {"autoscaling": {"enabled": True}},
        "spec.autoscaling.targetGoodputPerWorker",
        "required when autoscaling is enabled",
        id="autoscaling-no-target",
    ),
    pytest.param(
        {"resources": {"limits": {"memory": "lots"}}},
        "spec.resources.limits.memory",
        "should match",
        id="bad-quantity",
    ),
    pytest.param({"replica": 2}, "spec.replica", "unknown field", id="unknown-field"),
    pytest.param({"spares": 17}, "spec.spares", "less than or equal to 16", id="spares-17"),
    pytest.param({"bucketKiB": 0}, "spec.bucketKiB", "greater than or equal to 1", id="bucket-0"),
    pytest.param({"microBatch": 0}, "spec.microBatch", "greater than or equal to 1", id="micro-0"),
]


@pytest.mark.parametrize(("spec", "field", "words"), INVALID_JOBS)
def test_invalid_job_is_rejected_naming_the_field(
    control_plane: ControlPlane, crds: list[str], namespace: str, spec, field: str, words: str
) -> None:
    manifest = job("bad", namespace, **spec)
    done = create(control_plane, manifest)
    assert done.returncode != 0, f"accepted: {spec}"
    assert field in done.stderr and words in done.stderr, done.stderr
    with pytest.raises(ValidationError):  # the model agrees with the API server
        ChaosJob.model_validate(manifest)
    assert control_plane.kubectl("get", "chaosjob", "bad", "-n", namespace, check=False).returncode


def test_immutable_fields_cannot_change(
    control_plane: ControlPlane, crds: list[str], namespace: str
) -> None:
    create(control_plane, job("fixed", namespace, bucketKiB=1024), check=True)
    for field, value in (("globalBatch", 128), ("seed", 7), ("entry", "m:f"), ("bucketKiB", 512)):
        done = control_plane.kubectl(
            "patch", "chaosjob", "fixed", "-n", namespace, "--type=merge",
            "-p", json.dumps({"spec": {field: value}}), check=False,
        )  # fmt: skip
        assert done.returncode != 0 and f"{field} is immutable" in done.stderr, done.stderr
    control_plane.kubectl(
        "patch", "chaosjob", "fixed", "-n", namespace, "--type=merge",
        "-p", json.dumps({"spec": {"image": "chaos-train:0.2.0"}}),
    )  # fmt: skip


def test_explain_shows_the_descriptions(control_plane: ControlPlane, crds: list[str]) -> None:
    # The API server publishes a new CRD's OpenAPI shortly after it is Established.
    def explain() -> subprocess.CompletedProcess | None:
        done = control_plane.kubectl("explain", "chaosjob.spec.replicas", check=False)
        return done if done.returncode == 0 else None

    done = poll(explain, "OpenAPI of chaosjobs")
    text = " ".join(done.stdout.split())
    assert "FIELD: replicas <integer>" in done.stdout
    assert "Number of workers this party runs for the job" in text
    peer_text = control_plane.kubectl("explain", "chaospeer.spec.keyFingerprint").stdout
    assert "SHA-256 of the remote operator's public key" in " ".join(peer_text.split())


def test_scale_subresource(control_plane: ControlPlane, crds: list[str], namespace: str) -> None:
    create(control_plane, job("sc", namespace, replicas=1, minReplicas=1), check=True)
    control_plane.kubectl("scale", "chaosjob/sc", "-n", namespace, "--replicas=3")
    assert control_plane.get("chaosjob", "sc", namespace)["spec"]["replicas"] == 3
    # Scaling beyond maxReplicas goes through the same CEL rule.
    done = control_plane.kubectl(
        "scale", "chaosjob/sc", "-n", namespace, "--replicas=9", check=False
    )
    assert done.returncode != 0 and "replicas must lie within" in done.stderr, done.stderr
    # The operator reports pods and selector in status; the scale subresource reads them.
    status = {"replicas": 3, "selector": "chaos.training.dev/job=sc"}
    control_plane.kubectl(
        "patch", "chaosjob", "sc", "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": status}),
    )  # fmt: skip
    scale = json.loads(
        control_plane.kubectl(
            "get", "chaosjob", "sc", "-n", namespace, "--subresource=scale", "-o", "json"
        ).stdout
    )
    assert scale["kind"] == "Scale" and scale["spec"]["replicas"] == 3
    assert scale["status"] == {"replicas": 3, "selector": "chaos.training.dev/job=sc"}


def test_status_is_kept_and_printed(
    control_plane: ControlPlane, crds: list[str], namespace: str
) -> None:
    create(control_plane, job("st", namespace, replicas=2), check=True)
    status = {
        "phase": "Running",
        "currentStep": 42,
        "steps": 100,
        "progress": "43/100",
        "localMembers": 2,
        "remoteMembers": 3,
        "spares": "1/2",
        "lastScaleOutDelaySeconds": 1.5,
        "observedGeneration": 1,
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "WorkersReady",
                "message": "2 of 2 workers ready",
                "lastTransitionTime": "2025-01-01T00:00:00Z",
                "observedGeneration": 1,
            }
        ],
        "undeclared": "pruned",
    }
    control_plane.kubectl(
        "patch", "chaosjob", "st", "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": status}),
    )  # fmt: skip
    stored = control_plane.get("chaosjob", "st", namespace)
    del status["undeclared"]
    assert stored["status"] == status
    assert ChaosJob.model_validate(stored).status.conditions[0].reason == "WorkersReady"
    table = control_plane.kubectl("get", "chaosjob", "st", "-n", namespace, "-o", "wide").stdout
    header, row = table.splitlines()
    assert header.split()[:10] == [
        "NAME", "FEDERATION", "PHASE", "REPLICAS", "SPARES", "READY", "LOCAL", "REMOTE", "STEP",
        "PROGRESS",
    ]  # fmt: skip
    assert row.split()[:10] == [
        "st", "mnist", "Running", "2", "1/2", "True", "2", "3", "42", "43/100"
    ]  # fmt: skip
    # A bad condition is refused by the status subresource too.
    bad = {"conditions": [{**status["conditions"][0], "status": "Maybe"}]}
    done = control_plane.kubectl(
        "patch", "chaosjob", "st", "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": bad}), check=False,
    )  # fmt: skip
    assert done.returncode != 0 and "status.conditions[0].status" in done.stderr, done.stderr


def test_peer_needs_exactly_one_trust_anchor(
    control_plane: ControlPlane, crds: list[str], namespace: str
) -> None:
    create(control_plane, peer("by-key", namespace, keyFingerprint=FINGERPRINT), check=True)
    create(control_plane, peer("by-ca", namespace, caBundle=PEM), check=True)
    stored = control_plane.get("chaospeer", "by-key", namespace)
    assert stored["spec"]["policy"] == {"mayContributeWorkers": True}
    assert ChaosPeer.model_validate(stored).spec.key_fingerprint == FINGERPRINT
    for name, spec in (("both", {"caBundle": PEM, "keyFingerprint": FINGERPRINT}), ("none", {})):
        done = create(control_plane, peer(name, namespace, **spec))
        assert done.returncode != 0, name
        assert "exactly one of caBundle and keyFingerprint must be set" in done.stderr
        assert "spec" in done.stderr
    done = create(control_plane, peer("fp", namespace, keyFingerprint="sha256:abc"))
    assert done.returncode != 0 and "spec.keyFingerprint" in done.stderr, done.stderr
    done = create(
        control_plane,
        peer("plain", namespace, keyFingerprint=FINGERPRINT, endpoint="http://peer.example"),
    )
    assert done.returncode != 0 and "spec.endpoint" in done.stderr, done.stderr


def test_second_api_server_on_the_same_etcd_is_separate(
    control_plane: ControlPlane, control_plane_factory, namespace: str
) -> None:
    party_b = control_plane_factory("/party-b")
    assert party_b.server != control_plane.server
    assert party_b.kubectl("get", "namespace", namespace, check=False).returncode != 0
    other = f"b-{secrets.token_hex(4)}"
    party_b.kubectl("create", "namespace", other)
    assert control_plane.kubectl("get", "namespace", other, check=False).returncode != 0
    version = json.loads(party_b.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == version["clientVersion"]["gitVersion"]


TEMPLATE = {
    "metadata": {"labels": {"team": "vision"}},
    "spec": {
        "nodeSelector": {"gpu": "h100"},
        "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "priorityClassName": "training",
        "imagePullSecrets": [{"name": "registry"}],
        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "imagenet"}}],
        "containers": [
            {
                "name": "trainer",
                "env": [{"name": "NCCL_DEBUG", "value": "INFO"}],
                "resources": {"limits": {"nvidia.com/gpu": 1, "memory": "8Gi"}},
                "volumeMounts": [{"name": "data", "mountPath": "/data", "readOnly": True}],
            }
        ],
    },
}

OWNED_TEMPLATES = [
    pytest.param(
        {"spec": {"restartPolicy": "Always"}},
        "spec.template.spec.restartPolicy",
        id="restart-policy",
    ),
    pytest.param(
        {"spec": {"containers": [{"name": "trainer", "command": ["python"]}]}},
        "spec.template.spec.containers[].command",
        id="trainer-command",
    ),
    pytest.param(
        {"spec": {"containers": [{"name": "replicator", "ports": [{"containerPort": 1}]}]}},
        "spec.template.spec.containers[].ports",
        id="replicator-ports",
    ),
    pytest.param(
        {"spec": {"volumes": [{"name": "snapshots", "emptyDir": {}}]}},
        "spec.template.spec.volumes[].name",
        id="snapshot-volume",
    ),
    pytest.param(
        {"metadata": {"labels": {"chaos.training.dev/job": "x"}}},
        "spec.template.metadata.labels",
        id="owned-label",
    ),
]


def test_template_is_a_pod_template_with_quantities_and_explain(
    control_plane: ControlPlane, crds: list[str], namespace: str
) -> None:
    create(control_plane, job("templated", namespace, template=TEMPLATE, steps=100), check=True)
    stored = control_plane.get("chaosjob", "templated", namespace)["spec"]["template"]
    assert stored == TEMPLATE  # nothing pruned: the schema is the PodTemplateSpec's
    ChaosJob.model_validate(job("templated", namespace, template=TEMPLATE))
    bad = json.loads(json.dumps(TEMPLATE))
    bad["spec"]["tolerations"][0]["tolerationSeconds"] = "soon"
    done = create(control_plane, job("typed", namespace, template=bad))
    assert done.returncode != 0 and "tolerationSeconds" in done.stderr, done.stderr

    def explain() -> subprocess.CompletedProcess | None:
        done = control_plane.kubectl(
            "explain", "chaosjob.spec.template.spec.nodeSelector", check=False
        )
        return done if done.returncode == 0 else None

    text = " ".join(poll(explain, "OpenAPI of chaosjobs").stdout.split())
    assert "NodeSelector is a selector which must be true for the pod to fit on a node" in text


@pytest.mark.parametrize(("template", "field"), OWNED_TEMPLATES)
def test_owned_template_fields_are_refused_naming_the_field(
    control_plane: ControlPlane, crds: list[str], namespace: str, template, field: str
) -> None:
    manifest = job("owned", namespace, template=template)
    done = create(control_plane, manifest)
    assert done.returncode != 0, f"accepted: {template}"
    assert field in done.stderr and "operator" in done.stderr, done.stderr
    with pytest.raises(ValidationError, match="operator"):
        ChaosJob.model_validate(manifest)


@pytest.mark.parametrize("name", ["chaosjob.yaml", "chaosjob-gpu.yaml"])
def test_example_jobs_are_admitted(
    control_plane: ControlPlane, crds: list[str], namespace: str, name: str
) -> None:
    import yaml

    from tests.controlplane.plane import REPO

    body = yaml.safe_load((REPO / "examples" / name).read_text())
    body["metadata"]["namespace"] = namespace
    create(control_plane, body, check=True)
