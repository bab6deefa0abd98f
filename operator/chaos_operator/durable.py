"""What a job's status says of its checkpoints, pure (docs/checkpoints.md, *On Kubernetes*).

The operator cannot read a claim; it learns of the checkpoints from the writer: its
`/metrics` (`chaos_checkpoint_step`, `chaos_checkpoint_resumed_step`,
`chaos_checkpoint_skipped_info`) and the termination message of its trainer
(`{"step": N, "checkpoint": S}`). `durable_status` turns that and the previous status into
`durableStep`, `resumedFrom` and `finalCheckpoint`, with an Event when a resume is learned.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from chaos_operator.api.durable import MAX_SKIPPED

TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


@dataclass(frozen=True)
class DurableReading:
    """What the members said of the checkpoints at one reconcile."""

    checkpoint_step: int | None = None
    """The newest checkpoint a member wrote or resumed from."""
    resumed_step: int | None = None
    """The step a resumed initial member started at (0: no checkpoint verified)."""
    skipped: tuple[str, ...] = ()
    """Checkpoints it passed over, `<checkpoint>: <why>` each."""


def checkpoint_name(step: int) -> str:
    """A checkpoint's directory in its claim (the worker's `checkpoint.checkpoint_name`)."""
    return f"step-{step:08d}"


def durable_status(
    previous: Mapping[str, Any],
    reading: DurableReading,
    *,
    claim: str,
    restarted: bool,
    succeeded: bool,
    steps: int,
    now: datetime,
) -> tuple[dict[str, Any], list[tuple[str, str, str]]]:
    """(`durableStep`, `resumedFrom`, `finalCheckpoint` as they are now, Events as
    (reason, message, type)).

    `restarted`: a new initial set starts now after every member was lost, from the newest
    checkpoint on `claim` (`resumedFrom` without a step until the writer reports it). When
    it reports, `durableStep` becomes the step it resumed from (a newer checkpoint that did
    not verify no longer counts) and Events say where it started and what it skipped; until
    then and afterwards `durableStep` only grows. `finalCheckpoint`: once the job
    `succeeded` with the checkpoint of its last state (step `steps`) known.
    """
    out: dict[str, Any] = {}
    events: list[tuple[str, str, str]] = []
    durable = previous.get("durableStep")
    resumed = dict(previous.get("resumedFrom") or {})
    if restarted:
        resumed = {"claimName": claim, "time": now.strftime(TIME_FORMAT)}
    elif resumed and "step" not in resumed and reading.resumed_step is not None:
        step = reading.resumed_step
        resumed["step"] = step
        skipped = list(reading.skipped[:MAX_SKIPPED])
        if skipped:
            resumed["skipped"] = [s[:512] for s in skipped]
            events.append(
                (
                    "CheckpointSkipped",
                    f"checkpoints on claim {claim} that do not verify were skipped: "
                    + "; ".join(skipped),
                    "Warning",
                )
            )
        if step > 0:
            resumed["path"] = checkpoint_name(step)
            durable = step
            events.append(
                (
                    "ResumedFromCheckpoint",
                    f"resumed from {resumed['path']} on claim {claim} (step {step})",
                    "Normal",
                )
            )
        else:
            durable = None
            events.append(
                (
                    "NoCheckpoint",
                    f"no checkpoint on claim {claim} verifies: started at step 0",
                    "Warning",
                )
            )
    if reading.checkpoint_step is not None and reading.checkpoint_step > 0:
        durable = max(reading.checkpoint_step, durable or 0)
    if durable is not None:
        out["durableStep"] = durable
    if resumed:
        out["resumedFrom"] = resumed
    final = previous.get("finalCheckpoint")
    if final is None and succeeded and durable is not None and durable >= steps:
        final = {"claimName": claim, "path": checkpoint_name(durable), "step": durable}
    if final is not None:
        out["finalCheckpoint"] = final
    return out, events
