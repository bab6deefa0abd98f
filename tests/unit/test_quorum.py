"""The manifest a newcomer believes: the one enough sources sealed alike."""

from __future__ import annotations

import pytest
from chaos_worker.net.wire import SnapshotManifest
from chaos_worker.replication.quorum import ManifestVotes

pytestmark = pytest.mark.unit

LAYOUT = {"entries": [], "total_bytes": 0}


def manifest(sender: str, digest: str) -> SnapshotManifest:
    return SnapshotManifest(sender=sender, step=3, shards=1, layout=LAYOUT, sha256=[digest * 64])


def test_one_manifest_is_not_enough_while_two_sources_can_seal():
    votes = ManifestVotes()
    votes.add("w0", manifest("w0", "a"))
    assert votes.agreed(2) is None and votes.missing(2) == 1
    assert votes.agreed(1).sender == "w0" and votes.missing(1) == 0


def test_two_equal_manifests_outvote_a_third():
    votes = ManifestVotes()
    votes.add("w9", manifest("w9", "f"))
    votes.add("w1", manifest("w1", "a"))
    assert votes.agreed(2) is None and votes.missing(2) == 1
    votes.add("w0", manifest("w0", "a"))
    agreed = votes.agreed(2)
    assert agreed.sha256 == ["a" * 64]
    assert votes.dissenters(agreed) == ["w9"]


def test_a_source_speaks_once():
    votes = ManifestVotes()
    votes.add("w9", manifest("w9", "f"))
    votes.add("w9", manifest("w9", "f"))
    assert votes.agreed(2) is None
