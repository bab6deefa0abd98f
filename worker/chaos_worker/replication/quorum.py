"""Which manifest of a snapshot a newcomer believes: the one two sources agree on.

Every member holds the same training state at a step (they apply the same reduced totals),
so the sealed manifests of one snapshot from two honest sources are equal, digest for
digest. A single hostile source can seal a manifest of its own forged state (its shards
then agree with it), but it cannot make a second source seal the same digests. So a
newcomer with two or more live sources uses a manifest only once two of them sealed the
same one; a source whose manifest differs from the agreed one is refused as forged. With
one source left, its sealed manifest is all there is (as before this check).
"""

from __future__ import annotations

import json
from collections import Counter

from chaos_worker.net.wire import SnapshotManifest

AGREEING = 2
"""Sources whose sealed manifests must be equal before one is used (fewer if fewer live)."""


def _content(manifest: SnapshotManifest) -> str:
    """What two honest manifests of one snapshot share: all but the sender and its seal."""
    return json.dumps(
        [manifest.step, manifest.shards, manifest.layout, manifest.sha256], sort_keys=True
    )


class ManifestVotes:
    """The sealed manifests of one snapshot, one per source, and the one they agree on."""

    def __init__(self) -> None:
        self.by_sender: dict[str, SnapshotManifest] = {}

    def add(self, sender: str, manifest: SnapshotManifest) -> None:
        """Hold `sender`'s manifest (its first one; a source speaks once)."""
        self.by_sender.setdefault(sender, manifest)

    def agreed(self, needed: int) -> SnapshotManifest | None:
        """A manifest at least `needed` sources sealed (the most backed one), or None."""
        if not self.by_sender:
            return None
        counts = Counter(_content(m) for m in self.by_sender.values())
        content, votes = counts.most_common(1)[0]
        if votes < min(needed, AGREEING):
            return None
        return next(m for m in self.by_sender.values() if _content(m) == content)

    def missing(self, needed: int) -> int:
        """More manifests that must agree with the most backed one before one is used."""
        counts = Counter(_content(m) for m in self.by_sender.values())
        best = counts.most_common(1)[0][1] if counts else 0
        return max(0, min(needed, AGREEING) - best)

    def dissenters(self, agreed: SnapshotManifest) -> list[str]:
        """The sources whose manifest differs from `agreed`."""
        return sorted(s for s, m in self.by_sender.items() if _content(m) != _content(agreed))
