"""What the reconcile is told of a job's pods (`ObservedPod`) and the Events it plans."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from chaos_operator.pods import (
    ANN_ADDRESS,
    ANN_ORDINAL,
    ANN_WRITER,
    LABEL_MEMBER,
    LABEL_ROLE,
    ROLE_SPARE,
)

LIVE_PHASES = frozenset({"Pending", "Running", "Unknown"})


@dataclass(frozen=True)
class ObservedPod:
    """What the reconcile needs to know about one existing pod of the job."""

    name: str
    phase: str = "Pending"
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    ready: bool = False
    deleting: bool = False
    ip: str | None = None
    """Where the pod's `/metrics` can be scraped (its IP, once it has one)."""
    unschedulable: bool = False
    """The scheduler found no node for it (`PodScheduled` False, `Unschedulable`)."""
    uid: str = ""
    """The pod's uid (its identity Secret's owner)."""
    final_step: int | None = None
    """The last step its ended trainer reported in its termination message, if any."""
    final_checkpoint: int | None = None
    """The newest checkpoint its ended trainer wrote or resumed from (termination message)."""

    @property
    def member(self) -> str:
        return self.labels.get(LABEL_MEMBER, self.name)

    @property
    def ordinal(self) -> int:
        """The member's ordinal (from the annotation, else the name's `-w<n>` suffix)."""
        raw = self.annotations.get(ANN_ORDINAL) or self.name.rpartition("-w")[2]
        try:
            return int(raw)
        except ValueError:
            return -1

    @property
    def writer(self) -> bool:
        """It mounts the party's checkpoint claim and writes the checkpoints."""
        return self.annotations.get(ANN_WRITER) == "true"

    @property
    def spare(self) -> bool:
        """A warm spare in standby: no member (`chaos_operator.spares`)."""
        return self.labels.get(LABEL_ROLE) == ROLE_SPARE

    @property
    def live(self) -> bool:
        return not self.deleting and self.phase in LIVE_PHASES

    @property
    def running(self) -> bool:
        return self.live and self.phase == "Running"

    @property
    def address(self) -> str | None:
        return self.annotations.get(ANN_ADDRESS)


@dataclass(frozen=True)
class PodEvent:
    """A Kubernetes Event to post on the job once the action behind it is done."""

    reason: str
    message: str
    type: str = "Normal"
