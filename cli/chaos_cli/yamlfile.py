"""Read a YAML file named on the command line: bounded, strict, and one-line errors.

Stricter than `yaml.safe_load` where a manifest would otherwise be misread or exhaust the
machine: a mapping with the same key twice is refused (as `kubectl` refuses it), and so
are a file over `MAX_BYTES`, nesting too deep for the parser, and aliases that expand to
more than `MAX_VALUES` values (a "billion laughs" file, or an alias that contains itself).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import yaml

from chaos_cli.errors import UserError

MAX_BYTES = 1 << 20
"""The largest YAML file read: a manifest is a few hundred bytes."""
MAX_VALUES = 100_000
"""The most values (mapping keys and values, list items) a file may hold, aliases expanded."""
_MERGE = "tag:yaml.org,2002:merge"


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a mapping with the same key twice."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == _MERGE:  # `<<: *base` may be overridden by a later key
                continue
            key = self.construct_object(key_node, deep=True)
            with contextlib.suppress(TypeError):  # unhashable: the base class says so
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: str) -> Any:
    """The one YAML document in the file `path`; UserError naming the problem otherwise."""
    try:
        with Path(path).open("rb") as file:
            data = file.read(MAX_BYTES + 1)
    except OSError as exc:
        raise UserError(f"{path}: {exc.strerror or exc}") from None
    if len(data) > MAX_BYTES:
        raise UserError(f"{path}: larger than {MAX_BYTES >> 20} MiB; not a manifest")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file") from None
    try:
        body = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise UserError(f"{path}: not valid YAML{where}: {' '.join(problem.split())}") from None
    except RecursionError:
        raise UserError(f"{path}: not valid YAML: nested too deeply") from None
    except Exception as exc:  # a bad tagged scalar: `!!int abc`, `2024-02-30`, `!!bool x`
        raise UserError(f"{path}: not valid YAML: {type(exc).__name__}: {exc}") from None
    if _values(body) > MAX_VALUES:
        raise UserError(f"{path}: more than {MAX_VALUES} values once its aliases are expanded")
    return body


def _values(body: Any) -> int:
    """How many values `body` holds, counting each alias as a copy (at most MAX_VALUES + 1)."""
    count, stack = 0, [body]
    while stack and count <= MAX_VALUES:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list | tuple | set):
            stack.extend(item)
    return count
