"""Generate the `apiextensions.k8s.io/v1` CRDs of the Chaos API from its pydantic models.

pydantic writes JSON Schema 2020-12; a CRD needs a *structural* OpenAPI v3 schema. The
conversion (`structural_schema`) inlines every `$ref`, turns `anyOf: [X, null]` into plain `X`
(the field is simply optional; a null sent by a client is pruned by the API server), drops
`title`, turns `const` into `enum`, rewrites numeric `exclusiveMinimum`/`exclusiveMaximum`
into the OpenAPI v3.0 form, replaces `uniqueItems` by `x-kubernetes-list-type: set`, drops
`additionalProperties: false`, and reduces `metadata` to `type: object`. Anything else that a
CRD cannot express (unions, recursion, unknown keywords, untyped nodes) raises `SchemaError`, so
a model change that would produce a bad CRD fails in the unit tests, not in a cluster.

`chaos crds --out crds` writes the files; `chaos crds --check crds` compares them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import yaml
from pydantic import BaseModel

from chaos_operator.api.chaosjob import ChaosJob
from chaos_operator.api.chaospeer import ChaosPeer
from chaos_operator.api.meta import GROUP, VERSION

HEADER = (
    "# Generated from chaos_operator.api by `chaos crds --out crds`. Do not edit by hand:\n"
    "# change the models, regenerate, and commit both.\n"
)

#: Schema keywords that may appear in the result, in the order they are written.
KEY_ORDER = (
    "description",
    "type",
    "format",
    "enum",
    "default",
    "minimum",
    "exclusiveMinimum",
    "maximum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "maxProperties",
    "required",
    "x-kubernetes-int-or-string",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type",
    "x-kubernetes-validations",
    "additionalProperties",
    "items",
    "properties",
)
_ALLOWED = frozenset(KEY_ORDER)
_UNTYPED_OK = ("x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields")
#: Keys of one CEL rule (`x-kubernetes-validations` item), in the order they are written.
RULE_ORDER = ("rule", "message", "messageExpression", "fieldPath", "reason", "optionalOldSelf")


class SchemaError(ValueError):
    """A model that cannot be expressed as a structural CRD schema."""


@dataclass(frozen=True)
class CrdKind:
    """One custom resource: its model and what the CRD adds around the schema."""

    model: type[BaseModel]
    plural: str
    singular: str
    columns: tuple[dict[str, Any], ...]
    scale: bool = False
    categories: tuple[str, ...] = ("chaos",)
    short_names: tuple[str, ...] = field(default=())

    @property
    def kind(self) -> str:
        """The kind, e.g. `ChaosJob`."""
        return self.model.__name__

    @property
    def filename(self) -> str:
        """`<group>_<plural>.yaml`, as controller-gen names CRD files."""
        return f"{GROUP}_{self.plural}.yaml"


def _column(name: str, kind: str, path: str, description: str, priority: int = 0) -> dict:
    column = {"name": name, "type": kind, "jsonPath": path, "description": description}
    if priority:
        column["priority"] = priority
    return column


_AGE = _column("Age", "date", ".metadata.creationTimestamp", "Time since creation.")
_READY = '.status.conditions[?(@.type=="Ready")].status'

KINDS: tuple[CrdKind, ...] = (
    CrdKind(
        model=ChaosJob,
        plural="chaosjobs",
        singular="chaosjob",
        scale=True,
        columns=(
            _column("Federation", "string", ".spec.federation", "Federated job."),
            _column("Phase", "string", ".status.phase", "Summary of the job's state."),
            _column("Replicas", "integer", ".spec.replicas", "Desired workers of this party."),
            _column("Spares", "string", ".status.spares", "Warm spares ready/existing."),
            _column("Ready", "string", _READY, "Ready condition.", priority=1),
            _column("Local", "integer", ".status.localMembers", "Members of this party.", 1),
            _column("Remote", "integer", ".status.remoteMembers", "Members of other parties.", 1),
            _column("Step", "integer", ".status.currentStep", "Latest completed step."),
            _column("Progress", "string", ".status.progress", "Steps done of the job's steps."),
            _AGE,
        ),
    ),
    CrdKind(
        model=ChaosPeer,
        plural="chaospeers",
        singular="chaospeer",
        columns=(
            _column("Party", "string", ".spec.party", "Remote party."),
            _column("Endpoint", "string", ".spec.endpoint", "Remote operator."),
            _column("Reachable", "boolean", ".status.reachable", "Last handshake succeeded."),
            _column("Members", "integer", ".status.members", "Remote workers in our jobs."),
            _column(
                "Handshake", "date", ".status.lastHandshakeTime", "Last handshake.", priority=1
            ),
            _AGE,
        ),
    ),
)


def structural_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of a top-level API object (apiVersion, kind, ...)."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    props = raw.get("properties", {})
    props["apiVersion"] = {
        "type": "string",
        "description": "Versioned schema of this object; chaos.training.dev/v1alpha1.",
    }
    props["kind"] = {"type": "string", "description": f"Kind of this object; {model.__name__}."}
    props["metadata"] = {"type": "object"}
    return _convert(raw, defs, (model.__name__,), "")


def _convert(node: dict[str, Any], defs: dict[str, Any], seen: tuple[str, ...], path: str) -> dict:
    node = dict(node)
    # Inline references and nullable unions until the node itself is plain.
    while "$ref" in node or "anyOf" in node:
        if "$ref" in node:
            name = node.pop("$ref").removeprefix("#/$defs/")
            if name in seen:
                raise SchemaError(f"{path or '<root>'}: recursive model {name} cannot be a CRD")
            seen = (*seen, name)
            node = {**defs[name], **node}  # the field's description/default win
        else:
            variants = [v for v in node.pop("anyOf") if v != {"type": "null"}]
            if len(variants) != 1:
                raise SchemaError(
                    f"{path}: unions cannot be structural; use one type or int-or-string"
                )
            node = {**variants[0], **node}
    for keyword in ("allOf", "oneOf", "not"):
        if keyword in node:
            raise SchemaError(f"{path}: {keyword} is not supported in generated CRDs")
    node.pop("title", None)
    if "default" in node and node["default"] is None:
        del node["default"]
    if "const" in node:
        node["enum"] = [node.pop("const")]
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if not isinstance(node.get(bound), bool) and bound in node:
            node[plain] = node.pop(bound)
            node[bound] = True
    if node.pop("uniqueItems", False):
        node["x-kubernetes-list-type"] = "set"
    extra = node.pop("additionalProperties", False)
    if extra is not False and extra is not True:
        if "properties" in node:
            raise SchemaError(f"{path}: additionalProperties together with properties")
        node["additionalProperties"] = _convert(extra, defs, seen, f"{path}.<value>")
    elif extra is True:
        raise SchemaError(f"{path}: free-form objects need x-kubernetes-preserve-unknown-fields")
    if "properties" in node:
        node["properties"] = {
            name: _convert(sub, defs, seen, f"{path}.{name}".lstrip("."))
            for name, sub in node["properties"].items()
        }
    if "items" in node:
        node["items"] = _convert(node["items"], defs, seen, f"{path}[]")
    if "x-kubernetes-validations" in node:
        node["x-kubernetes-validations"] = [
            _rule(rule, path) for rule in node["x-kubernetes-validations"]
        ]
    unknown = set(node) - _ALLOWED
    if unknown:
        raise SchemaError(f"{path}: keywords a CRD cannot carry: {', '.join(sorted(unknown))}")
    if "type" not in node and not any(node.get(k) for k in _UNTYPED_OK):
        raise SchemaError(f"{path}: every node of a structural schema needs a type")
    return {key: node[key] for key in KEY_ORDER if key in node}


def _rule(rule: dict[str, Any], path: str) -> dict[str, Any]:
    unknown = set(rule) - set(RULE_ORDER)
    if unknown or "rule" not in rule:
        raise SchemaError(f"{path}: malformed CEL rule {rule!r}")
    return {key: rule[key] for key in RULE_ORDER if key in rule}


def crd(kind: CrdKind) -> dict[str, Any]:
    """The CustomResourceDefinition object of one kind."""
    subresources: dict[str, Any] = {"status": {}}
    if kind.scale:
        subresources["scale"] = {
            "specReplicasPath": ".spec.replicas",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector",
        }
    names: dict[str, Any] = {
        "kind": kind.kind,
        "listKind": f"{kind.kind}List",
        "plural": kind.plural,
        "singular": kind.singular,
        "categories": list(kind.categories),
    }
    if kind.short_names:
        names["shortNames"] = list(kind.short_names)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{kind.plural}.{GROUP}",
            "labels": {"app.kubernetes.io/part-of": "chaos"},
        },
        "spec": {
            "group": GROUP,
            "names": names,
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": structural_schema(kind.model)},
                    "subresources": subresources,
                    "additionalPrinterColumns": copy.deepcopy(list(kind.columns)),
                }
            ],
        },
    }


def render(kind: CrdKind) -> str:
    """The CRD of one kind as the YAML text committed in `crds/`."""
    return HEADER + yaml.safe_dump(crd(kind), sort_keys=False, width=100, allow_unicode=True)


def generate() -> dict[str, str]:
    """Every CRD file: name -> YAML text."""
    return {kind.filename: render(kind) for kind in KINDS}
