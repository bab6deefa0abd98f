"""Whom a replicator serves: the newcomers of the join plans its member is a source of.

A member records (joiner, step) when it takes in a join plan that assigns it shards (a plan
sealed by a member of its view and checked, `net.signing.Gate`), and forgets it when the
join is over (`SnapshotStore.release`). With TLS its replicator serves a `SnapshotRequest`
only to a recorded joiner for its step, the joiner being whom the requesting connection's
certificate names. A replicator in the member's process reads the record in memory; a
replicator process reads `admitted.json` in the snapshot directory they share (written
atomically, mode 0600), as it reads the slots.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from chaos_worker.net.tls import Stamp, stamp
from chaos_worker.replication.private import write_atomically

ADMITTED_FILE = "admitted.json"
MAX_ADMITTED = 64
"""Joins recorded at once; past it the oldest is forgotten (a join that failed is never
released)."""

_PAIRS = TypeAdapter(list[tuple[str, int]])


class Admissions:
    """The (joiner, step) pairs a replicator may serve; see the module docstring."""

    def __init__(self, directory: Path | None = None) -> None:
        self.path = directory / ADMITTED_FILE if directory is not None else None
        self._pairs: dict[tuple[str, int], None] = {}
        self._stamp: Stamp | None = None

    def admit(self, joiner: str, step: int) -> None:
        """`joiner` may pull snapshot `step` from this member's replicator."""
        self._pairs.pop((joiner, step), None)
        self._pairs[joiner, step] = None
        while len(self._pairs) > MAX_ADMITTED:
            del self._pairs[next(iter(self._pairs))]
        self._write()

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
        try:
            write_atomically(self.path, _PAIRS.dump_json(list(self._pairs)))
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
            pairs = _PAIRS.validate_json(self.path.read_bytes())
        except (OSError, ValidationError):
            return
        self._pairs = dict.fromkeys(pairs[-MAX_ADMITTED:])
