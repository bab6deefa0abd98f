"""A spare pod's order to join: its projected config file, re-read while it waits.

A pod has no launcher and no control channel. A spare runs with a config that says
`standby` and names its own file (`standby_file`: the downwardAPI projection of the pod's
`chaos.training.dev/config` annotation). The operator activates it by patching that
annotation to the same config with `standby` false and `join` set; the kubelet rewrites the
file (atomically, within its sync period) and `watch` notices it. What the file holds is
validated as any config, and must be this worker's own config but for `standby` and `join`:
a file that changes anything else (another id, another entry) is refused with a warning,
and the spare goes on waiting.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from chaos_worker.config import WorkerConfig

MAX_BYTES = 256 << 10
"""Largest file read: all of an object's annotations together hold at most 256 KiB."""
POLL_S = 0.5
"""How often a waiting spare re-reads its file."""
ORDERED = frozenset({"standby", "join"})
"""The only fields an activation may change."""

log = logging.getLogger(__name__)


def join_order(standby: WorkerConfig, text: str) -> str | None:
    """The address to join through when `text` (the file's content) orders the `standby`
    worker to join; None while it still says standby. ValueError saying why a content is
    refused (not a valid config, e.g. no standby and no `join`; other fields changed)."""
    config = WorkerConfig.model_validate_json(text)  # a ValidationError is a ValueError
    mine, theirs = standby.model_dump(exclude=ORDERED), config.model_dump(exclude=ORDERED)
    changed = sorted(k for k in mine if mine[k] != theirs[k])
    if changed:
        raise ValueError(f"it changes {', '.join(changed)}; only standby and join may change")
    return None if config.standby else config.join  # not standby: join is set (validated)


def read_bounded(path: str) -> str:
    """The file's text (OSError if unreadable, ValueError if over `MAX_BYTES`)."""
    with open(path, "rb") as source:
        data = source.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise ValueError(f"it is larger than {MAX_BYTES} bytes")
    return data.decode("utf-8", errors="replace")


async def watch(
    path: str, standby: WorkerConfig, on_order: Callable[[str], None], poll_s: float = POLL_S
) -> None:
    """Re-read `path` every `poll_s` seconds until it orders the join, then call
    `on_order(address)` once. A refused content is logged once and waited past."""
    refused: str | None = None
    while True:
        try:
            address = join_order(standby, read_bounded(path))
        except OSError:  # being rewritten, or not projected yet
            address = None
        except ValueError as exc:
            reason = str(exc)
            if reason != refused:
                log.warning("standby: refused the config in %s: %s", path, reason)
                refused = reason
            address = None
        if address is not None:
            log.info("standby: ordered to join through %s", address)
            on_order(address)
            return
        await asyncio.sleep(poll_s)
