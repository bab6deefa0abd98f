"""The structural OpenAPI schema of `spec.template` (a core/v1 PodTemplateSpec) for the CRD.

Derived from the `kubernetes` client's models (pydantic in client >= 35), which carry the
field names, types and descriptions of the Kubernetes OpenAPI. The whole pod spec is typed
(no `$ref`: every model is inlined); only the API's free-form `object` fields keep
`x-kubernetes-preserve-unknown-fields`. The CRD must stay small enough for `kubectl apply`
(its last-applied annotation holds at most 256 KiB), so descriptions are cut to their first
sentence (about 135 KB of JSON in all). The schema checks types and names, not every rule of
a pod (e.g. required-together fields): the API server checks those when the operator creates
the pod (the refusal is in the operator's log).

The result is committed as `podtemplate.schema.json` next to this module (the CRD must not
depend on which client version is installed); `generate()` rebuilds it and a unit test
compares the two when the client version recorded in the file is the installed one.
"""

from __future__ import annotations

import json
import re
import types
import typing
from functools import cache
from importlib import resources
from typing import Any

DEPTH = 12
"""Levels below `template.spec` typed at most (a guard: the pod spec's models end at 7)."""
SCHEMA_FILE = "podtemplate.schema.json"
#: (model, field) pairs that are resource quantities (strings in the client, int-or-string in
#: the API): a team writes `nvidia.com/gpu: 1`.
QUANTITIES = {
    ("V1ResourceRequirements", "limits"),
    ("V1ResourceRequirements", "requests"),
    ("V1VolumeResourceRequirements", "limits"),
    ("V1VolumeResourceRequirements", "requests"),
    ("V1PodSpec", "overhead"),
    ("V1EmptyDirVolumeSource", "size_limit"),
    ("V1ResourceFieldSelector", "divisor"),
}
_QUANTITY = {"x-kubernetes-int-or-string": True}
_SENTENCE = re.compile(r"^(.*?[.!?])(\s|$)", re.S)


def _short(text: str | None) -> str | None:
    """The first sentence of a description."""
    if not text:
        return None
    match = _SENTENCE.match(text.strip())
    return (match.group(1) if match else text.strip())[:300]


def _strip(annotation: Any) -> Any:
    """`T` of `Optional[T]` and `Annotated[T, ...]`."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


def _node(annotation: Any, depth: int) -> dict[str, Any]:
    annotation = _strip(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):  # int or str: IntOrString
        return {"x-kubernetes-int-or-string": True}
    if origin in (list, typing.List):  # noqa: UP006
        return {"type": "array", "items": _node(typing.get_args(annotation)[0], depth)}
    if origin in (dict, typing.Dict):  # noqa: UP006
        value = _node(typing.get_args(annotation)[1], depth)
        return {"type": "object", "additionalProperties": value}
    if annotation is str:
        return {"type": "string"}
    if annotation is bool:
        return {"type": "boolean"}
    if annotation is int:
        return {"type": "integer", "format": "int64"}
    if annotation is float:
        return {"type": "number"}
    if hasattr(annotation, "model_fields"):
        if depth > DEPTH:
            return {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
        return _model(annotation, depth + 1)
    if annotation is Any or annotation is object:
        return {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    return {"type": "string"}  # datetime and other scalars travel as strings


def _model(model: Any, depth: int) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    required: list[str] = []
    for name, info in model.model_fields.items():
        key = info.serialization_alias or info.alias or name
        sub = dict(_QUANTITY) if (model.__name__, name) in QUANTITIES else None
        if sub is None:
            sub = _node(info.annotation, depth)
        elif sub and typing.get_origin(_strip(info.annotation)) in (dict, typing.Dict):  # noqa: UP006
            sub = {"type": "object", "additionalProperties": dict(_QUANTITY)}
        text = _short(info.description)
        properties[key] = {"description": text, **sub} if text else sub
        if info.is_required():
            required.append(key)
    out: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        out["required"] = required
    return out


def generate() -> dict[str, Any]:
    """The schema of a PodTemplateSpec from the installed `kubernetes` client, with the
    client's version (`x-chaos-generated-from`, dropped from the CRD)."""
    import kubernetes
    from kubernetes.client import V1PodSpec

    return {
        "x-chaos-generated-from": f"kubernetes=={kubernetes.__version__}",
        "description": "Pod template merged with what the operator owns (docs/operator.md).",
        "type": "object",
        "properties": {
            "metadata": {
                "description": "Labels and annotations added to every worker pod.",
                "type": "object",
                "properties": {
                    "labels": {
                        "description": "Labels of every worker pod.",
                        "type": "object",
                        "additionalProperties": {"type": "string"},
                    },
                    "annotations": {
                        "description": "Annotations of every worker pod.",
                        "type": "object",
                        "additionalProperties": {"type": "string"},
                    },
                },
            },
            "spec": {
                "description": "Pod spec merged into each worker pod's spec.",
                # no required fields: a template may set only, say, nodeSelector
                **{k: v for k, v in _model(V1PodSpec, 1).items() if k != "required"},
            },
        },
    }


@cache
def committed() -> dict[str, Any]:
    """The committed schema (`podtemplate.schema.json`)."""
    text = resources.files("chaos_operator.api").joinpath(SCHEMA_FILE).read_text("utf-8")
    return json.loads(text)


def template_schema() -> dict[str, Any]:
    """The committed schema without its provenance key (what the CRD embeds)."""
    schema = json.loads(json.dumps(committed()))
    schema.pop("x-chaos-generated-from", None)
    return schema


def write() -> None:
    """Rewrite `podtemplate.schema.json` from the installed client (then `chaos crds --out`)."""
    path = resources.files("chaos_operator.api").joinpath(SCHEMA_FILE)
    with resources.as_file(path) as file:
        file.write_text(json.dumps(generate(), indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":  # python -m chaos_operator.api.podschema
    write()
