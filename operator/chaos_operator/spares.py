"""Warm spares of a ChaosJob (`spec.spares`), pure: which spares become members, which to
create or delete, and what the status says of them.

A spare is an ordinary worker pod of the job (its template and resources: it counts against
quotas like any pod), labelled `chaos.training.dev/role: spare`, whose config says `standby`
and names its own projected config file (`standby_file`). It takes the job's next ordinal
when it is created, so its member id, address and certificate are already those it will
have as a member. It is in no view: it takes no samples and no tree edge, and its loss is
no membership event (it is replaced, with no Event and no failure counted).

Activation (`activation`): the reconcile takes a spare instead of creating a newcomer (a
lost member's replacement, a scale-up), never for an initial set nor for the checkpoint
writer (a claim cannot be mounted into a running pod), and patches it in one write: label
`role: member`, and its config annotation with `standby` false and `join` set. The kubelet
projects the annotation into the file the spare re-reads (`chaos_worker.join.activation`),
and it joins as any newcomer does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from chaos_worker.config import WorkerConfig
from pydantic import ValidationError

from chaos_operator.api import ChaosJob
from chaos_operator.observed import ObservedPod, PodEvent
from chaos_operator.pods import (
    ANN_CONFIG,
    LABEL_ROLE,
    ROLE_MEMBER,
    Options,
    member_name,
    worker_config,
    worker_pod,
)

Patch = dict[str, Any]
ANY_SEED = "0.0.0.0:0"
"""A placeholder seed: whether a spare could be ordered at all."""


def activation(pod: ObservedPod, seed: str) -> Patch | None:
    """The patch that makes spare `pod` a member joining through `seed`: its own config with
    `standby` false and `join` set, and the role label. None when its config annotation is
    no standby config (edited by hand: the spare cannot be ordered)."""
    raw = pod.annotations.get(ANN_CONFIG, "")
    try:
        config = WorkerConfig.model_validate_json(raw)
        fields = json.loads(raw)
        WorkerConfig.model_validate({**fields, "standby": False, "join": seed})
    except (ValidationError, ValueError):
        return None
    if not config.standby or not config.standby_file or config.members:
        return None
    ordered = json.dumps({**fields, "standby": False, "join": seed}, separators=(",", ":"))
    return {"metadata": {"labels": {LABEL_ROLE: ROLE_MEMBER}, "annotations": {ANN_CONFIG: ordered}}}


def usable(spares: Sequence[ObservedPod], seed: str) -> list[tuple[ObservedPod, Patch]]:
    """The spares that can be ordered to join through `seed`, with their patches: live ones,
    running first (started up, or nearly), then the oldest."""
    live = sorted((p for p in spares if p.live), key=lambda p: (not p.running, p.ordinal))
    out = []
    for pod in live:
        patch = activation(pod, seed)
        if patch is not None:
            out.append((pod, patch))
    return out


@dataclass(frozen=True)
class SparePlan:
    """The spares to create and delete, and the status figure `ready/total` after them."""

    create: list[dict[str, Any]] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    events: dict[str, PodEvent] = field(default_factory=dict)
    next_member: int = 0
    status: str = "0/0"


def plan_spares(
    job: ChaosJob,
    spares: Sequence[ObservedPod],
    *,
    taken: set[str],
    training: bool,
    ordinal: int,
    options: Options,
) -> SparePlan:
    """Keep `spec.spares` spares while the job trains (`training`); none otherwise (a spare
    would wait for ever). `taken`: the spares this reconcile makes members; `ordinal`: the
    next unused one. Spares that ended are deleted and replaced, surplus ones (newest first)
    deleted, without an Event: no member is lost or removed."""
    name = job.metadata.name or ""
    keep = [p for p in spares if p.live and p.name not in taken and activation(p, ANY_SEED)]
    gone = [p.name for p in spares if not p.deleting and p.name not in taken]
    if not training:
        return SparePlan(delete=gone, next_member=ordinal)
    want = job.spec.spares
    keep = sorted(keep, key=lambda p: p.ordinal)[:want]
    delete = [n for n in gone if n not in {p.name for p in keep}]
    create, events = [], {}
    for n in range(ordinal, ordinal + want - len(keep)):
        config = worker_config(job, n, options, standby=True)
        create.append(worker_pod(job, n, config))
        pod = member_name(name, n)
        events[pod] = PodEvent("SpareAdded", f"spare {config.id} starts up and waits in standby")
    ready = sum(1 for p in keep if p.running and p.ready)
    status = f"{ready}/{len(keep) + len(create)}"
    return SparePlan(create, delete, events, ordinal + len(create), status)
