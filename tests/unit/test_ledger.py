"""The sent-bytes ledger between a replicator process and its trainer."""

from __future__ import annotations

import asyncio
import os

import pytest
from chaos_worker.replication.ledger import LEDGER_FILE, SentLedger, SentReader

pytestmark = pytest.mark.unit


def _bump(path) -> None:
    """Make the next write look new even on a file system with coarse timestamps."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))


def test_the_trainer_counts_each_byte_once_across_writes_and_restarts(tmp_path) -> None:
    ledger, reader = SentLedger(tmp_path), SentReader(tmp_path)
    assert reader.news() == {}  # nothing written yet
    ledger.add("w3", 100)
    ledger.add("w3", 50)
    ledger.add("w4", 7)
    ledger.flush()
    assert reader.news() == {"w3": 150, "w4": 7}
    assert reader.news() == {}  # unchanged file: nothing new
    ledger.add("w3", 10)
    ledger.flush()
    _bump(ledger.path)
    assert reader.news() == {"w3": 10}
    # a restarted replicator starts from zero: what it reports is all new
    again = SentLedger(tmp_path)
    again.add("w5", 30)
    again.flush()
    _bump(again.path)
    assert reader.news() == {"w5": 30}


def test_an_unreadable_ledger_counts_nothing(tmp_path) -> None:
    reader = SentReader(tmp_path)
    for garbage in (b"{not json", b'{"w3": -5}', b'["w3", 5]', b'{"w3": "many"}'):
        (tmp_path / LEDGER_FILE).write_bytes(garbage)
        _bump(tmp_path / LEDGER_FILE)
        assert reader.news() == {}


def test_the_replicator_keeps_the_ledger_written_and_flushes_when_stopped(tmp_path) -> None:
    ledger, reader = SentLedger(tmp_path), SentReader(tmp_path)

    async def main() -> None:
        writer = asyncio.get_running_loop().create_task(ledger.keep_written(every_s=3600))
        await asyncio.sleep(0)
        ledger.add("w3", 42)
        writer.cancel()  # stopping writes what is left
        with pytest.raises(asyncio.CancelledError):
            await writer

    asyncio.run(main())
    assert reader.news() == {"w3": 42}
    assert not [p for p in tmp_path.iterdir() if p.name != LEDGER_FILE]  # no partial left
