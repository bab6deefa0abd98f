"""What a member knows about a recovery round: the statuses the coordinator waits for."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RecoveryRound:
    """What this member knows about the recovery round of its current epoch."""

    started: float
    statuses: dict[str, int] = field(default_factory=dict)
    epochs: dict[str, int] = field(default_factory=dict)
    """The epoch each status was made in (a member ahead reports in its own epoch)."""
    decided: bool = False

    def ahead(self, epoch: int, now: float) -> RecoveryRound | None:
        """A round of `epoch` holding the statuses already made in it (None: none was)."""
        kept = {m: e for m, e in self.epochs.items() if e >= epoch}
        if not kept:
            return None
        return RecoveryRound(now, {m: self.statuses[m] for m in kept}, kept)
