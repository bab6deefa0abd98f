"""`spec.template` of a ChaosJob: a pod template merged with what the operator owns.

The operator owns, in every worker pod: the containers `trainer` and `replicator` (their
`image`, `command`, `args` and `ports`), the volumes `snapshots`, `config`, `tls` and
`checkpoints` and their mount paths, `restartPolicy`, `hostname` and `subdomain`, and the
label and annotation keys under `chaos.training.dev/`. A template that sets any of these is
refused, by the CRD's CEL rules on a cluster and by this model for `chaos run FILE`, naming
the field. Everything else
(resources, nodeSelector, tolerations, affinity, volumes and mounts, env, imagePullSecrets,
serviceAccountName, priorityClassName, sidecars, ...) is the user's (`pods.merge_template`).

The CRD schema is the Kubernetes PodTemplateSpec's (`podschema`); this model checks only the
owned fields and keeps the rest as given.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, WithJsonSchema, model_validator

from chaos_operator.api.meta import ApiModel
from chaos_operator.api.podschema import template_schema

SNAPSHOT_DIR = "/snapshots"
CONFIG_DIR = "/etc/chaos"
TLS_DIR = "/etc/chaos-tls"
CHECKPOINT_DIR = "/checkpoints"
OWNED_CONTAINERS = ("trainer", "replicator")
OWNED_CONTAINER_FIELDS = ("image", "command", "args", "ports", "terminationMessagePath")
OWNED_POD_FIELDS = ("restartPolicy", "hostname", "subdomain")
RESERVED_VOLUMES = ("snapshots", "config", "tls", "checkpoints")
RESERVED_MOUNTS = (SNAPSHOT_DIR, CONFIG_DIR, TLS_DIR, CHECKPOINT_DIR)
RESERVED_PREFIX = "chaos.training.dev/"
OWNED = "is owned by the operator"
MAX_CONTAINERS = 32
MAX_MOUNTS = 64
MAX_VOLUMES = 128
MAX_KEYS = 128
MAX_NAME = 253
MAX_PATH = 4096
_PATH = "spec.template.spec"


def _cel_list(values: tuple[str, ...]) -> str:
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


def _forbid(node: dict[str, Any], rule: str, message: str, field: str) -> None:
    rule_ = {"rule": rule, "message": message, "fieldPath": field, "reason": "FieldValueForbidden"}
    if not field:
        del rule_["fieldPath"]
    node.setdefault("x-kubernetes-validations", []).append(rule_)


def crd_schema() -> dict[str, Any]:
    """The CRD schema of `spec.template`: the PodTemplateSpec's with CEL rules refusing what
    the operator owns. The rules sit on list items and maps, with bounds (`MAX_*`) that keep
    the API server's estimated CEL cost within its budget."""
    schema = template_schema()
    spec = schema["properties"]["spec"]
    props = spec["properties"]
    for f in OWNED_POD_FIELDS:
        _forbid(spec, f"!has(self.{f})", f"{_PATH}.{f} {OWNED}", f".{f}")
    containers = props["containers"]
    containers["maxItems"] = MAX_CONTAINERS
    container = containers["items"]
    container["properties"]["name"]["maxLength"] = MAX_NAME
    names = _cel_list(OWNED_CONTAINERS)
    for f in OWNED_CONTAINER_FIELDS:
        _forbid(
            container,
            f"!(self.name in {names}) || !has(self.{f})",
            f"{_PATH}.containers[].{f} of trainer and replicator {OWNED} (spec.image sets the "
            "image)",
            f".{f}",
        )
    mounts = container["properties"]["volumeMounts"]
    mounts["maxItems"] = MAX_MOUNTS
    mount = mounts["items"]
    mount["properties"]["mountPath"]["maxLength"] = MAX_PATH
    _forbid(
        mount,
        f"!(self.mountPath in {_cel_list(RESERVED_MOUNTS)})",
        f"{_PATH}.containers[].volumeMounts[].mountPath: {', '.join(RESERVED_MOUNTS)} are the "
        "operator's mount paths",
        ".mountPath",
    )
    volumes = props["volumes"]
    volumes["maxItems"] = MAX_VOLUMES
    volume = volumes["items"]
    volume["properties"]["name"]["maxLength"] = MAX_NAME
    _forbid(
        volume,
        f"!(self.name in {_cel_list(RESERVED_VOLUMES)})",
        f"{_PATH}.volumes[].name: {', '.join(RESERVED_VOLUMES)} are the operator's volumes",
        ".name",
    )
    for key in ("labels", "annotations"):
        node = schema["properties"]["metadata"]["properties"][key]
        node["maxProperties"] = MAX_KEYS
        _forbid(
            node,
            f"self.all(k, !k.startsWith('{RESERVED_PREFIX}'))",
            f"spec.template.metadata.{key}: keys under {RESERVED_PREFIX} are the operator's",
            "",
        )
    return schema


def owned_fields(template: dict[str, Any]) -> list[str]:
    """The fields of `template` (a PodTemplateSpec, camelCase) the operator owns, as paths."""
    found: list[str] = []
    meta = template.get("metadata") or {}
    for key in ("labels", "annotations"):
        found += [
            f"spec.template.metadata.{key}[{k}]"
            for k in meta.get(key) or {}
            if k.startswith(RESERVED_PREFIX)
        ]
    spec = template.get("spec") or {}
    found += [f"{_PATH}.{f}" for f in OWNED_POD_FIELDS if f in spec]
    for i, container in enumerate(spec.get("containers") or ()):
        if container.get("name") in OWNED_CONTAINERS:
            found += [
                f"{_PATH}.containers[{i}].{f}" for f in OWNED_CONTAINER_FIELDS if f in container
            ]
        for j, mount in enumerate(container.get("volumeMounts") or ()):
            if mount.get("mountPath") in RESERVED_MOUNTS:
                found.append(f"{_PATH}.containers[{i}].volumeMounts[{j}].mountPath")
    for i, volume in enumerate(spec.get("volumes") or ()):
        if volume.get("name") in RESERVED_VOLUMES:
            found.append(f"{_PATH}.volumes[{i}].name")
    return found


class PodTemplate(ApiModel):
    """A pod template (core/v1 PodTemplateSpec) for the job's worker pods."""

    metadata: dict[str, Any] = Field(
        default_factory=dict, description="Labels and annotations added to every worker pod."
    )
    spec: dict[str, Any] = Field(
        default_factory=dict, description="Pod spec merged into each worker pod's spec."
    )

    @model_validator(mode="after")
    def _nothing_owned(self) -> PodTemplate:
        owned = owned_fields({"metadata": self.metadata, "spec": self.spec})
        if owned:
            raise ValueError(f"{', '.join(owned)}: {OWNED} (docs/operator.md, Pod template)")
        return self


#: `spec.template` as the CRD describes it (the real PodTemplateSpec schema).
TemplateField = Annotated[PodTemplate, WithJsonSchema(crd_schema())]
