"""Snapshot directories: only their owner reads them, and a dead owner's are cleared.

Every directory here is made under pytest's `tmp_path` (never /dev/shm): the reaper runs
on that base only, so nothing another run on this machine owns is ever touched.
"""

from __future__ import annotations

import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from chaos_worker.replication.ledger import SentLedger
from chaos_worker.replication.private import LOCK, PrivateDirectory, reap
from chaos_worker.replication.snapshot import SnapshotStore

pytestmark = pytest.mark.security

OWNER = """
import sys, time
from pathlib import Path
from chaos_worker.replication.private import PrivateDirectory
owned = PrivateDirectory.create(sys.argv[2], base=Path(sys.argv[1]))
print(owned.path, flush=True)
time.sleep(600)
"""


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _owner(base: Path, me: str) -> tuple[subprocess.Popen, Path]:
    """A process that made its private directory in `base` and lives on."""
    proc = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(base), me], stdout=subprocess.PIPE, text=True
    )
    path = Path(proc.stdout.readline().strip())
    assert path.is_dir(), "the owner did not start"
    return proc, path


def test_slots_metadata_and_ledger_are_private_to_the_owner(tmp_path: Path) -> None:
    owned = PrivateDirectory.create("w0", base=tmp_path)
    assert _mode(owned.path) == 0o700
    configured = tmp_path / "configured" / "snapshots"
    for directory in (owned.path, configured):
        store = SnapshotStore(directory)
        model = torch.nn.Linear(3, 2)
        store.publish(1, model, torch.optim.SGD(model.parameters(), lr=0.1))
        ledger = SentLedger(directory)
        ledger.add("w1", 10)
        ledger.flush()
        files = [p for p in directory.iterdir() if p.is_file()]
        assert {p.name for p in files} >= {"slot-0.bin", "slot-0.json", "sent.json"}
        assert {p.name: _mode(p) for p in files} == {p.name: 0o600 for p in files}
    assert _mode(configured) == 0o700
    owned.remove()
    assert not owned.path.exists()


def test_the_directory_of_a_killed_owner_is_removed_and_no_other(tmp_path: Path) -> None:
    killed, dead = _owner(tmp_path, "w1")
    alive, live = _owner(tmp_path, "w2")
    foreign = tmp_path / "chaos-w3-from-an-older-version"  # no lock: not provably dead
    foreign.mkdir()
    other = tmp_path / "unrelated"
    other.mkdir()
    mine = PrivateDirectory.create("w4", base=tmp_path)
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait(30)
        assert (dead / LOCK).exists()  # SIGKILL left it behind
        assert reap(tmp_path) == [dead]
        assert not dead.exists()
        assert live.is_dir() and foreign.is_dir() and other.is_dir() and mine.path.is_dir()
    finally:
        alive.kill()
        alive.wait(30)
        mine.remove()


def test_a_worker_starting_clears_the_dead_ones_first(tmp_path: Path) -> None:
    killed, dead = _owner(tmp_path, "w1")
    killed.send_signal(signal.SIGKILL)
    killed.wait(30)
    fresh = PrivateDirectory.create("w1", base=tmp_path)
    assert not dead.exists()
    assert fresh.path.is_dir() and (fresh.path / LOCK).exists()
    assert reap(tmp_path) == []  # its own is locked while it lives
    fresh.remove()
