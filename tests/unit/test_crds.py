"""API models and CRD generation: committed CRDs match the generator, schemas are structural,
and the models reject what the API server rejects, naming the field."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from chaos_cli.main import main
from chaos_cli.validation import describe_validation_error
from chaos_operator.api import ChaosJob, ChaosPeer
from chaos_operator.api.crdgen import KINDS, SchemaError, crd, generate, structural_schema
from pydantic import BaseModel, Field, ValidationError

pytestmark = pytest.mark.unit

CRDS = Path(__file__).resolve().parents[2] / "crds"
FINGERPRINT = "sha256:" + "ab" * 32
PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def job(**spec: Any) -> dict[str, Any]:
    """A valid ChaosJob manifest with `spec` fields overridden."""
    base = {
        "federation": "mnist",
        "image": "chaos-train:0.1.0",
        "entry": "chaos_worker.examples.digits:factory",
        "globalBatch": 64,
        "replicas": 2,
        "minReplicas": 1,
        "maxReplicas": 4,
    }
    base.update(spec)
    return {"apiVersion": "chaos.training.dev/v1alpha1", "kind": "ChaosJob", "spec": base}


def peer(**spec: Any) -> dict[str, Any]:
    """A ChaosPeer manifest with the given spec (endpoint filled in)."""
    return {
        "kind": "ChaosPeer",
        "spec": {"party": "beta", "endpoint": "https://peer.example:8443", **spec},
    }


def schema_nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node below `node` (itself included) with a readable path."""
    yield path or "<root>", node
    for name, sub in node.get("properties", {}).items():
        yield from schema_nodes(sub, f"{path}.{name}".lstrip("."))
    if "items" in node:
        yield from schema_nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from schema_nodes(node["additionalProperties"], f"{path}.<value>")


def all_keys(value: Any) -> Iterator[str]:
    """Every mapping key anywhere inside `value`."""
    if isinstance(value, dict):
        for key, sub in value.items():
            yield key
            yield from all_keys(sub)
    elif isinstance(value, list):
        for sub in value:
            yield from all_keys(sub)


def test_committed_crds_equal_the_generator_output() -> None:
    files = generate()
    assert sorted(files) == sorted(p.name for p in CRDS.glob("*.yaml"))
    for name, text in files.items():
        assert (CRDS / name).read_text(encoding="utf-8") == text, f"regenerate crds/{name}"
    assert main(["crds", "--check", str(CRDS)]) == 0


def test_check_reports_changed_and_stale_files(tmp_path: Path, capsys) -> None:
    shutil.copytree(CRDS, tmp_path, dirs_exist_ok=True)
    changed = tmp_path / KINDS[0].filename
    changed.write_text(changed.read_text() + "# edited\n")
    (tmp_path / "old.yaml").write_text("kind: Stale\n")
    assert main(["crds", "--check", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"{changed}: differs" in err and "old.yaml: not produced" in err


def test_out_writes_files_that_check_accepts(tmp_path: Path) -> None:
    assert main(["crds", "--out", str(tmp_path / "new")]) == 0
    assert main(["crds", "--check", str(tmp_path / "new")]) == 0


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.kind)
def test_schema_is_structural(kind) -> None:
    document = yaml.safe_load(generate()[kind.filename])
    schema = document["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    forbidden = {"$ref", "$defs", "anyOf", "allOf", "oneOf", "not", "title", "const", "uniqueItems"}
    assert not forbidden & set(all_keys(schema))
    for path, node in schema_nodes(schema):
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        assert not ("properties" in node and "additionalProperties" in node), path
        for bound in ("exclusiveMinimum", "exclusiveMaximum"):
            assert isinstance(node.get(bound, True), bool), f"{path}: {bound} must be a bool"
        # the pod template's schema is Kubernetes' own (some of its nodes are undescribed)
        if path not in ("<root>", "metadata") and not path.startswith("spec.template."):
            assert node.get("description"), f"{path} has no description"
    assert schema["properties"]["metadata"] == {"type": "object"}


def test_crd_shape() -> None:
    jobs, peers = (crd(kind) for kind in KINDS)
    version = jobs["spec"]["versions"][0]
    assert jobs["metadata"]["name"] == "chaosjobs.chaos.training.dev"
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert {"Phase", "Replicas", "Step", "Progress", "Age"} <= set(columns)
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules = [r["rule"] for r in spec["x-kubernetes-validations"]]
    assert "self.minReplicas <= self.replicas && self.replicas <= self.maxReplicas" in rules
    assert spec["properties"]["autoscaling"]["default"] == {"enabled": False, "cooldownSeconds": 60}
    assert spec["properties"]["replicas"]["default"] == 1
    peer_spec = peers["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert peer_spec["x-kubernetes-validations"][0]["rule"] == (
        "has(self.caBundle) != has(self.keyFingerprint)"
    )
    assert "scale" not in peers["spec"]["versions"][0]["subresources"]


def test_valid_job_round_trips_with_defaults() -> None:
    manifest = job()
    del manifest["spec"]["replicas"], manifest["spec"]["minReplicas"]
    parsed = ChaosJob.model_validate(manifest)
    assert parsed.spec.replicas == 1 and parsed.spec.min_replicas == 1 and parsed.spec.seed == 0
    assert parsed.spec.autoscaling.enabled is False
    out = parsed.to_k8s()
    assert out["spec"]["globalBatch"] == 64 and out["spec"]["maxReplicas"] == 4
    assert ChaosJob.model_validate(out) == parsed


@pytest.mark.parametrize(
    ("spec", "field", "words"),
    [
        (
            {"replicas": 5},
            "spec",
            "replicas must lie within [minReplicas, maxReplicas] = [1, 4], got 5",
        ),
        ({"replicas": 0}, "spec", "got 0"),
        ({"minReplicas": 5}, "spec", "minReplicas must not exceed maxReplicas, got 5 > 4"),
        ({"entry": "digits"}, "spec.entry", "must match pattern"),
        ({"entry": "a.b:c:d"}, "spec.entry", "must match pattern"),
        ({"globalBatch": 0}, "spec.globalBatch", "greater than or equal to 1"),
        ({"globalBatch": -3}, "spec.globalBatch", "greater than or equal to 1"),
        ({"federation": "Not_DNS"}, "spec.federation", "must match pattern"),
        ({"autoscaling": {"enabled": True}}, "spec.autoscaling", "targetGoodputPerWorker"),
        (
            {"resources": {"limits": {"memory": "lots"}}},
            "spec.resources.limits.memory",
            "must be a resource quantity",
        ),
        ({"replica": 2}, "spec.replica", "not a known field"),
        ({"bucketKiB": 0}, "spec.bucketKiB", "greater than or equal to 1"),
        ({"bucketKiB": 2**20 + 1}, "spec.bucketKiB", "less than or equal to 1048576"),
        ({"microBatch": 0}, "spec.microBatch", "greater than or equal to 1"),
    ],
)
def test_invalid_job_is_rejected_naming_the_field(spec, field: str, words: str) -> None:
    with pytest.raises(ValidationError) as info:
        ChaosJob.model_validate(job(**spec))
    message = describe_validation_error(info.value)
    assert message.startswith(f"{field}"), message
    assert words in message


def test_resource_quantities_accept_ints_and_strings() -> None:
    parsed = ChaosJob.model_validate(
        job(resources={"requests": {"cpu": 2, "memory": "4Gi"}, "limits": {"cpu": "500m"}})
    )
    assert parsed.spec.resources.requests == {"cpu": 2, "memory": "4Gi"}


def test_peer_needs_exactly_one_trust_anchor() -> None:
    assert (
        ChaosPeer.model_validate(peer(keyFingerprint=FINGERPRINT)).spec.policy.max_workers is None
    )
    assert ChaosPeer.model_validate(peer(caBundle=PEM)).spec.policy.may_contribute_workers
    for spec in ({}, {"caBundle": PEM, "keyFingerprint": FINGERPRINT}):
        with pytest.raises(ValidationError, match="exactly one of caBundle and keyFingerprint"):
            ChaosPeer.model_validate(peer(**spec))


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"keyFingerprint": "sha256:XYZ"}, "spec.keyFingerprint"),
        ({"keyFingerprint": FINGERPRINT, "endpoint": "http://peer:80"}, "spec.endpoint"),
        ({"caBundle": "not pem"}, "spec.caBundle"),
        ({"keyFingerprint": FINGERPRINT, "policy": {"maxWorkers": -1}}, "spec.policy.maxWorkers"),
    ],
)
def test_invalid_peer_is_rejected_naming_the_field(spec, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        ChaosPeer.model_validate(peer(**spec))
    assert describe_validation_error(info.value).startswith(field)


class _Node(BaseModel):
    children: list[_Node] = Field(default_factory=list, description="Sub-nodes.")


class _Union(BaseModel):
    value: int | str = Field(description="Either.")


class _FreeForm(BaseModel):
    value: dict[str, Any] = Field(description="Anything.")


class _Untyped(BaseModel):
    value: Any = Field(description="Anything.")


@pytest.mark.parametrize(
    ("model", "words"),
    [
        (_Node, "recursive model"),
        (_Union, "unions"),
        (_FreeForm, "preserve-unknown-fields"),
        (_Untyped, "needs a type"),
    ],
)
def test_generator_refuses_what_a_crd_cannot_express(model, words: str) -> None:
    with pytest.raises(SchemaError, match=words):
        structural_schema(model)
