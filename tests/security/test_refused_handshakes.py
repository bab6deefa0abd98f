"""Refused TLS handshakes are a metric (issue #15): `chaos_refused_handshakes_total{reason}`.

Real sockets and real TLS 1.3 against a worker's own listener (`TcpTransport` with the
`LinkTls` a member builds, counting into its `WorkerMetrics`), and against a real replicator
process, whose count reaches its trainer through `HANDSHAKES_FILE`. Each refusal is read
from the counter as a scrape would; nothing the refused peer sent is delivered.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import pytest
from chaos_operator.federation.workerca import WorkerCA
from chaos_worker.config import TlsFiles
from chaos_worker.net.tls import HANDSHAKE_REASONS, LinkTls
from chaos_worker.net.transport import TcpTransport
from chaos_worker.net.wire import Hello, Ping
from chaos_worker.replication.ledger import HANDSHAKES_FILE, SentReader
from chaos_worker.replication.sidecar import start_child
from chaos_worker.replication.snapshot import SnapshotStore
from chaos_worker.telemetry.metrics import WorkerMetrics

from tests.security.test_identities import client_context, frames, open_link, send_raw
from tests.transportkit import Node, close_all, start, until

pytestmark = pytest.mark.security


def refused(metrics: WorkerMetrics) -> dict[str, float]:
    """`chaos_refused_handshakes_total` by reason, as a scrape reads it (zeros left out)."""
    values = {
        reason: metrics.registry.get_sample_value(
            "chaos_refused_handshakes_total", {"reason": reason}
        )
        for reason in HANDSHAKE_REASONS
    }
    return {reason: value for reason, value in values.items() if value}


def exposed(metrics: WorkerMetrics, reason: str, value: int) -> bool:
    """Whether the text exposition (what `/metrics` serves) has this sample."""
    sample = f'chaos_refused_handshakes_total{{reason="{reason}"}} {value:.1f}'
    return sample in metrics.render().decode().splitlines()


async def worker(name: str, files: TlsFiles) -> tuple[Node, WorkerMetrics]:
    """A listening worker transport whose refused handshakes count into its metrics."""
    metrics = WorkerMetrics(name)
    tls = LinkTls(files, name, count=metrics.observe_refused_handshake)
    return await start(name, factory=TcpTransport.secured(tls)), metrics


HELLO_PING = frames(Hello(sender="w1"), Ping(sender="w1", sent_at=1.0))


def test_a_certificate_of_an_untrusted_ca_is_counted_as_unknown_ca(
    ca: WorkerCA, other_ca: WorkerCA
) -> None:
    async def scenario() -> None:
        w0, metrics = await worker("w0", ca.issue("w0"))
        assert refused(metrics) == {}
        assert exposed(metrics, "unknown_ca", 0)
        # trusts the run's CA, so it gets through its half; w0 refuses its certificate
        foreign = client_context(str(ca.ca_file), other_ca.issue("w1"))
        assert await send_raw(w0.address, foreign, HELLO_PING) == b""
        await until(lambda: refused(metrics) == {"unknown_ca": 1}, "the refusal counted")
        assert exposed(metrics, "unknown_ca", 1)
        assert w0.got == []
        # an authenticated member's handshake is not counted, and its frames arrive
        w1_tls = client_context(str(ca.ca_file), ca.issue("w1"))
        writer = await open_link(w0.address, w1_tls)
        writer.write(HELLO_PING)
        await until(lambda: len(w0.got) == 1, "w1's ping")
        writer.close()
        assert refused(metrics) == {"unknown_ca": 1}
        await close_all(w0)

    asyncio.run(scenario())


def test_each_reason_of_a_refused_handshake_is_counted(ca: WorkerCA) -> None:
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
    expired = ca.issue("w1", days=1, not_before=long_ago)

    async def scenario() -> None:
        w0, metrics = await worker("w0", ca.issue("w0"))
        tries = [
            (client_context(str(ca.ca_file), expired), "expired"),
            (client_context(str(ca.ca_file), None), "no_certificate"),
            (None, "other"),  # plaintext: no TLS at all
        ]
        for n, (ctx, reason) in enumerate(tries, start=1):
            assert await send_raw(w0.address, ctx, HELLO_PING) == b""
            await until(lambda r=reason: refused(metrics).get(r) == 1, f"{reason} counted")
            assert sum(refused(metrics).values()) == n
        # a valid certificate of the run whose Hello names another member: its name
        w9 = client_context(str(ca.ca_file), ca.issue("w9"))
        assert await send_raw(w0.address, w9, HELLO_PING) == b""
        await until(lambda: refused(metrics).get("bad_name") == 1, "bad_name counted")
        assert w0.got == []
        await close_all(w0)

    asyncio.run(scenario())


def test_an_outgoing_link_counts_what_it_refuses_and_not_what_the_server_refuses(
    ca: WorkerCA, other_ca: WorkerCA
) -> None:
    """w2, of another CA, links to w0: w2 refuses w0's certificate (unknown_ca on w2's
    side); w0 gets w2's alert, which is w2's refusal, not its own. w3 of the run links to
    w0 as if it were w1: the server's certificate names another member (bad_name)."""

    async def scenario() -> None:
        w0, w0_metrics = await worker("w0", ca.issue("w0"))
        w2, w2_metrics = await worker("w2", other_ca.issue("w2"))
        w3, w3_metrics = await worker("w3", ca.issue("w3"))
        w2.transport.connect("w0", w0.address)
        w3.transport.connect("w1", w0.address)
        await until(lambda: refused(w2_metrics).get("unknown_ca", 0) >= 1, "w2's refusal")
        await until(lambda: refused(w3_metrics).get("bad_name", 0) >= 1, "w3's refusal")
        assert set(refused(w2_metrics)) == {"unknown_ca"}
        assert set(refused(w3_metrics)) == {"bad_name"}
        assert refused(w0_metrics) == {} and w0.got == []
        await close_all(w0, w2, w3)

    asyncio.run(scenario())


def test_a_replicator_process_counts_its_refused_handshakes_for_its_trainer(
    ca: WorkerCA, other_ca: WorkerCA, tmp_path: Path
) -> None:
    async def scenario() -> None:
        directory = tmp_path / "shm"
        SnapshotStore(directory)
        child = await start_child("w0", directory, "127.0.0.1", tls=ca.issue("w0"))
        counted: dict[str, int] = {}
        reader = SentReader(directory, HANDSHAKES_FILE)

        def refusals() -> bool:
            counted.update(reader.news())
            return bool(counted)

        try:
            foreign = client_context(str(ca.ca_file), other_ca.issue("w5"))
            assert await send_raw(child.address, foreign, HELLO_PING) == b""
            await until(refusals, "the replicator's refusal")
            assert counted == {"unknown_ca": 1}
        finally:
            await child.stop()

    asyncio.run(scenario())
