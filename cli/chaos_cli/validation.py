"""Turn a pydantic ValidationError into one line that names the offending field."""

from __future__ import annotations

import re

from pydantic import ValidationError

_SHOULD = re.compile(r"^(Input|Value|List|String|Dictionary|Object) should ")


def field_path(loc: tuple[int | str, ...]) -> str:
    """`("sources", 1, "bandwidth")` -> `sources[1].bandwidth`."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    return path


def describe_validation_error(exc: ValidationError) -> str:
    """`field: problem` for the first error, e.g. `sources[1].latency_s: must be >= 0`.

    Further errors are counted, not listed, so the result stays one line.
    """
    errors = exc.errors(include_url=False)
    first = errors[0]
    message = str(first["msg"]).removeprefix("Value error, ")
    message = _SHOULD.sub("must ", message)
    if first["type"] == "missing":
        message = "is required"
    elif first["type"] == "extra_forbidden":
        message = "is not a known field"
    elif first["type"] in ("model_type", "dict_type"):
        message = "must be an object"
    path = field_path(tuple(first["loc"])) or "input"
    more = (
        f" (and {len(errors) - 1} more problem{'s' * (len(errors) > 2)})" if len(errors) > 1 else ""
    )
    return f"{path}: {message}{more}".replace("\n", " ")
