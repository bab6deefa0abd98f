"""Kubernetes status conditions: set one, keep its transition time unless its status changes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any


def set_condition(
    conditions: Sequence[Mapping[str, Any]],
    type: str,
    status: str,
    reason: str,
    message: str,
    generation: int | None,
    now: datetime,
) -> list[dict[str, Any]]:
    """Conditions with `type` set; `lastTransitionTime` is kept unless `status` changes."""
    out = [dict(c) for c in conditions if c.get("type") != type]
    old = next((c for c in conditions if c.get("type") == type), None)
    since = old["lastTransitionTime"] if old and old.get("status") == status else None
    entry: dict[str, Any] = {
        "type": type,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since or now.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if generation is not None:
        entry["observedGeneration"] = generation
    out.append(entry)
    return sorted(out, key=lambda c: c["type"])
