"""What a replicator process sent, per peer, told to its trainer through a small file.

A replicator that runs as a process of its own (the pod's sidecar container, or the child
a trainer starts) shares only the snapshot directory with its trainer. It keeps its totals
there (`SentLedger`), and the trainer turns them into its
`chaos_replication_bytes_total{direction="sent"}` counter (`SentReader`), so a pod's one
metrics endpoint counts what its sidecar served. The requests it refused are kept the same
way, per reason (`REFUSED_FILE`), for `chaos_rejected_messages_total`, and the TLS
handshakes it refused (`HANDSHAKES_FILE`), for `chaos_refused_handshakes_total`.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from pydantic import NonNegativeInt, TypeAdapter, ValidationError

from chaos_worker.replication.private import write_atomically

LEDGER_FILE = "sent.json"
REFUSED_FILE = "refused.json"
"""Requests a replicator process refused, per reason (`net.bounds.REASONS`)."""
HANDSHAKES_FILE = "handshakes.json"
"""Handshakes a replicator process refused, per reason (`net.tls.HANDSHAKE_REASONS`)."""
WRITE_EVERY_S = 0.2
"""How often a replicator rewrites its ledger while it grows."""

_TOTALS = TypeAdapter(dict[str, NonNegativeInt])


class SentLedger:
    """The replicator's side: bytes sent per peer since it started, kept in `LEDGER_FILE`
    (or counts per key in the file `name`)."""

    def __init__(self, directory: Path, name: str = LEDGER_FILE) -> None:
        self.path = directory / name
        self.totals: dict[str, int] = {}
        self._dirty = False

    def add(self, peer: str, nbytes: int) -> None:
        self.totals[peer] = self.totals.get(peer, 0) + nbytes
        self._dirty = True

    def flush(self) -> None:
        """Rewrite the file if the totals grew (atomically: a reader never sees half)."""
        if not self._dirty:
            return
        self._dirty = False
        try:
            write_atomically(self.path, _TOTALS.dump_json(self.totals))
        except OSError:  # the directory is going away with the trainer
            self._dirty = True

    async def keep_written(self, every_s: float = WRITE_EVERY_S) -> None:
        """Flush every `every_s` until cancelled, then once more."""
        try:
            while True:
                await asyncio.sleep(every_s)
                self.flush()
        finally:
            self.flush()


class SentReader:
    """The trainer's side: what its replicator sent (or counted in `name`) since the last
    look."""

    def __init__(self, directory: Path, name: str = LEDGER_FILE) -> None:
        self.path = directory / name
        self._seen: dict[str, int] = {}
        self._version: int | None = None

    def news(self) -> dict[str, int]:
        """Bytes sent per peer since the last call. A total that went down means the
        replicator restarted from zero: all of it is new. An unreadable file counts nothing."""
        try:
            version = self.path.stat().st_mtime_ns
            if version == self._version:
                return {}
            totals = _TOTALS.validate_json(self.path.read_bytes())
        except (OSError, ValidationError):
            return {}
        self._version = version
        news = {}
        for peer, total in totals.items():
            before = self._seen.get(peer, 0)
            grown = total - before if total >= before else total
            if grown:
                news[peer] = grown
        self._seen = totals
        return news
