"""Whom a replicator serves: the newcomers of the join plans its member is a source of,
and the newcomers that announced a downlink probe.

A member records (joiner, step) when it takes in a join plan that assigns it shards (a plan
sealed by a member of its view and checked, `net.signing.Gate`), and forgets it when the
join is over (`SnapshotStore.release`). With TLS its replicator serves a `SnapshotRequest`
only to a recorded joiner for its step, the joiner being whom the requesting connection's
certificate names.

Probes come before a join plan: a newcomer announces its probe with a `probe` join
proposal, sealed by itself. A member that takes one in from a peer that is not a member of
its views records (joiner, attempt), the attempt being the proposal's id, at most once per
`PROBE_EVERY_S` per joiner (`expect_probe`). With TLS its replicator answers a
`ProbeRequest` only from a recorded joiner, and with at most `PROBE_BUDGET_FRAMES` frames
per attempt (`Replicator`), so that no authenticated peer can pull unbounded bytes.

A replicator in the member's process reads the records in memory; a replicator process
reads `admitted.json` in the snapshot directory they share (written atomically, mode
0600), as it reads the slots.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from chaos_worker.net.tls import Stamp, stamp
from chaos_worker.net.wire import MAX_PROBE_FRAMES
from chaos_worker.replication.private import write_atomically

ADMITTED_FILE = "admitted.json"
MAX_ADMITTED = 64
"""Joins recorded at once, and probes; past it the oldest is forgotten (a join that failed
is never released)."""
PROBE_BUDGET_FRAMES = MAX_PROBE_FRAMES + 1
"""Probe frames a joiner may pull from one replicator per attempt: the warm-up frame and
one train of the most frames a request may ask (`join/probe.py`, `join_probe_frames`)."""
PROBE_EVERY_S = 10.0
"""A joiner's new probe attempt is recorded only this long after its last one."""


class _Record(BaseModel):
    """What `ADMITTED_FILE` holds."""

    model_config = ConfigDict(extra="forbid")
    pulls: list[tuple[str, int]] = Field(default_factory=list)
    probes: list[tuple[str, str]] = Field(default_factory=list)


class Admissions:
    """The (joiner, step) pairs a replicator may serve, and the (joiner, attempt) pairs it
    may answer probes of; see the module docstring."""

    def __init__(self, directory: Path | None = None) -> None:
        self.path = directory / ADMITTED_FILE if directory is not None else None
        self._pairs: dict[tuple[str, int], None] = {}
        self._probes: dict[str, tuple[str, float]] = {}  # joiner -> (attempt, recorded at)
        self._stamp: Stamp | None = None

    def admit(self, joiner: str, step: int) -> None:
        """`joiner` may pull snapshot `step` from this member's replicator."""
        self._pairs.pop((joiner, step), None)
        self._pairs[joiner, step] = None
        keep_newest(self._pairs)
        self._write()

    def expect_probe(self, joiner: str, attempt: str, now: float) -> None:
        """`joiner`, no member, announced the probe of its join `attempt` at `now`: this
        member's replicator may answer it, unless the joiner's last attempt was recorded
        less than `PROBE_EVERY_S` ago (the copies of one proposal record nothing more)."""
        last = self._probes.get(joiner)
        if last is not None and (last[0] == attempt or now - last[1] < PROBE_EVERY_S):
            return
        self._probes.pop(joiner, None)
        self._probes[joiner] = (attempt, now)
        keep_newest(self._probes)
        self._write()

    def probing(self, joiner: str) -> str | None:
        """The attempt whose probe `joiner` may pull (None: none recorded)."""
        self._read()
        recorded = self._probes.get(joiner)
        return None if recorded is None else recorded[0]

    def forget(self, step: int) -> None:
        """The joins that pulled snapshot `step` are over."""
        gone = [pair for pair in self._pairs if pair[1] == step]
        for pair in gone:
            del self._pairs[pair]
        if gone:
            self._write()

    def admits(self, joiner: str, step: int) -> bool:
        """Whether `joiner` may pull snapshot `step` (read again from the file, if any,
        when it changed)."""
        self._read()
        return (joiner, step) in self._pairs

    def _write(self) -> None:
        if self.path is None:
            return
        probes = [(joiner, attempt) for joiner, (attempt, _) in self._probes.items()]
        record = _Record(pulls=list(self._pairs), probes=probes)
        try:
            write_atomically(self.path, record.model_dump_json().encode())
        except OSError:  # the directory is going away with the member
            return
        self._stamp = stamp(str(self.path))

    def _read(self) -> None:
        if self.path is None:
            return
        now = stamp(str(self.path))
        if now is None or now == self._stamp:
            return
        self._stamp = now
        try:
            record = _Record.model_validate_json(self.path.read_bytes())
        except (OSError, ValidationError):
            return
        self._pairs = dict.fromkeys(record.pulls)
        self._probes = {joiner: (attempt, 0.0) for joiner, attempt in record.probes}
        keep_newest(self._pairs)
        keep_newest(self._probes)


def keep_newest(records: dict) -> None:
    """Forget the oldest (first inserted) records past `MAX_ADMITTED`."""
    while len(records) > MAX_ADMITTED:
        del records[next(iter(records))]
