"""Identities for workers: mutual TLS on every worker link, a peer being whom its certificate
names (`chaos_worker.net.tls`), certificates from a run's CA (`WorkerCA`).

Real sockets and real TLS 1.3 throughout. A refusal is observed as the server closing the
connection; only then is "nothing was delivered" checked, and a positive control on the same
server shows that the same frames from an authenticated peer do get through. Waits poll a
condition with a generous deadline that only turns a hang into a failure.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from chaos_operator.federation.workerca import WorkerCA
from chaos_worker.config import TlsFiles, member_uri
from chaos_worker.net.sealed import open_sealed
from chaos_worker.net.tls import LinkTls, TlsError, identity_of
from chaos_worker.net.transport import TcpTransport, parse_address
from chaos_worker.net.wire import Hello, Ping, ShardData, SnapshotRequest, encode
from chaos_worker.replication.replicator import Replicator
from chaos_worker.replication.snapshot import SnapshotStore
from cryptography import x509

from tests.transportkit import DEADLINE_S, Node, close_all, start, until

pytestmark = pytest.mark.security


async def secure(name: str, files: TlsFiles) -> Node:
    """A listening TcpTransport `name` with mutual TLS from `files`."""
    return await start(name, factory=TcpTransport.secured(LinkTls(files, name)))


def frames(*messages) -> bytes:
    return b"".join(bytes(part) for message in messages for part in encode(message))


def client_context(ca_file: str, files: TlsFiles | None) -> ssl.SSLContext:
    """A TLS 1.3 client that trusts `ca_file` and shows `files`' certificate (None: none)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=ca_file)
    if files is not None:
        ctx.load_cert_chain(files.cert, files.key)
    return ctx


async def open_link(address: str, ctx: ssl.SSLContext) -> asyncio.StreamWriter:
    """A client's sealed link to a worker (`sealed.open_sealed`): its writes are frames."""
    _, writer = await open_sealed(*parse_address(address), ctx)
    return writer


async def send_raw(address: str, ctx: ssl.SSLContext | None, data: bytes) -> bytes:
    """Connect (over a sealed link with `ctx`, else plaintext), write `data`, and read
    until the server ends the connection; what it sent back in plaintext (over a sealed
    link a server sends nothing after its handshake but a TLS alert, not counted here)."""
    host, port = parse_address(address)
    got = b""
    try:
        if ctx is None:
            reader, writer = await asyncio.open_connection(host, port)
        else:
            reader, writer = await open_sealed(host, port, ctx)
    except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError):
        return got  # refused during the handshake
    try:
        writer.write(data)
        while chunk := await asyncio.wait_for(reader.read(1 << 16), DEADLINE_S):
            got += chunk if ctx is None else b""
    except (ssl.SSLError, ConnectionError):
        pass
    finally:
        writer.close()
    return got


def test_a_client_without_a_certificate_cannot_connect_or_send(ca: WorkerCA) -> None:
    async def scenario() -> None:
        w0 = await secure("w0", ca.issue("w0"))
        hello_ping = frames(Hello(sender="w1"), Ping(sender="w1", sent_at=1.0))
        for ctx in (client_context(str(ca.ca_file), None), None):  # TLS without cert; plain
            assert await send_raw(w0.address, ctx, hello_ping) == b""
        assert w0.got == [] and w0.gone == []
        # nor with a certificate, over TLS 1.2
        w1_files = ca.issue("w1")
        tls12 = client_context(str(ca.ca_file), w1_files)
        tls12.minimum_version = tls12.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises((ssl.SSLError, ConnectionResetError)):  # no TLS 1.2 handshake
            await asyncio.open_connection(*parse_address(w0.address), ssl=tls12)
        # the same frames from a client with w1's certificate, over TLS 1.3, are delivered
        w1_tls = client_context(str(ca.ca_file), w1_files)
        writer = await open_link(w0.address, w1_tls)
        writer.write(hello_ping)
        await until(lambda: len(w0.got) == 1, "w1's ping")
        assert w0.got[0][0] == "w1"
        writer.close()
        await close_all(w0)

    asyncio.run(scenario())


def test_a_certificate_from_another_ca_is_refused(ca: WorkerCA, other_ca: WorkerCA) -> None:
    async def scenario() -> None:
        w0 = await secure("w0", ca.issue("w0"))
        # trusts the run's CA, so it gets through its half of the handshake; w0 does not
        foreign = client_context(str(ca.ca_file), other_ca.issue("w1"))
        hello_ping = frames(Hello(sender="w1"), Ping(sender="w1", sent_at=1.0))
        assert await send_raw(w0.address, foreign, hello_ping) == b""
        assert w0.got == []
        # and a worker of the other CA does not take w0 for a member either
        with pytest.raises(ssl.SSLCertVerificationError):
            ctx = LinkTls(other_ca.issue("w2"), "w2").client
            await asyncio.open_connection(*parse_address(w0.address), ssl=ctx)
        await close_all(w0)

    asyncio.run(scenario())


def test_a_hello_as_another_member_is_refused_and_the_real_link_goes_on(ca: WorkerCA) -> None:
    async def scenario() -> None:
        w0 = await secure("w0", ca.issue("w0"))
        w1 = await secure("w1", ca.issue("w1"))
        w1.transport.connect("w0", w0.address)
        w1.transport.send("w0", Ping(sender="w1", sent_at=1.0))
        await until(lambda: len(w0.got) == 1, "w1's first ping")
        # w9 holds a valid certificate of the run, but says Hello as w1
        w9 = client_context(str(ca.ca_file), ca.issue("w9"))
        spoof = frames(Hello(sender="w1"), Ping(sender="w1", sent_at=666.0))
        assert await send_raw(w0.address, w9, spoof) == b""  # w0 closed it
        # w1's own link is unaffected: no disconnect, and its next frame arrives
        w1.transport.send("w0", Ping(sender="w1", sent_at=2.0))
        await until(lambda: len(w0.got) == 2, "w1's second ping")
        assert [(sender, m.sent_at) for sender, m, _ in w0.got] == [("w1", 1.0), ("w1", 2.0)]
        assert w0.gone == []
        # the same client saying Hello as itself is heard (as w9)
        honest = frames(Hello(sender="w9"), Ping(sender="w9", sent_at=9.0))
        writer = await open_link(w0.address, w9)
        writer.write(honest)
        await until(lambda: len(w0.got) == 3, "w9's ping")
        assert (w0.got[2][0], w0.got[2][1].sent_at) == ("w9", 9.0)
        writer.close()
        await close_all(w0, w1)

    asyncio.run(scenario())


def test_a_link_carries_frames_only_to_the_member_it_is_for(ca: WorkerCA) -> None:
    """The server's certificate must name the peer a link was opened to; no host name."""

    async def scenario() -> None:
        received: list[bytes] = []
        closed = asyncio.Event()

        async def impostor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            received.append(await reader.read())  # until the client closes
            writer.close()
            closed.set()

        w7 = LinkTls(ca.issue("w7"), "w7")  # a member of the run, but not w1
        server = await asyncio.start_server(impostor, "127.0.0.1", 0, ssl=w7.server)
        port = server.sockets[0].getsockname()[1]
        w0 = await secure("w0", ca.issue("w0"))
        w0.transport.connect("w1", f"127.0.0.1:{port}")
        w0.transport.send("w1", Ping(sender="w0", sent_at=1.0))
        await asyncio.wait_for(closed.wait(), DEADLINE_S)
        assert received[0] == b""  # handshake done, then closed before a single frame
        server.close()
        await close_all(w0)

    asyncio.run(scenario())


def test_expired_certificates_are_refused(ca: WorkerCA) -> None:
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
    expired = ca.issue("w1", days=1, not_before=long_ago)
    assert x509.load_pem_x509_certificate(Path(expired.cert).read_bytes()).not_valid_after_utc < (
        dt.datetime.now(dt.UTC)
    )

    async def scenario() -> None:
        w0 = await secure("w0", ca.issue("w0"))
        hello_ping = frames(Hello(sender="w1"), Ping(sender="w1", sent_at=1.0))
        assert await send_raw(w0.address, client_context(str(ca.ca_file), expired), b"") == b""
        assert await send_raw(w0.address, LinkTls(expired, "w1").client, hello_ping) == b""
        assert w0.got == []
        # a server with an expired certificate: the client's verification says why
        old = await secure("w1", expired)
        with pytest.raises(ssl.SSLCertVerificationError) as refused:
            ctx = LinkTls(ca.issue("w2"), "w2").client
            await asyncio.open_connection(*parse_address(old.address), ssl=ctx)
        assert refused.value.verify_message == "certificate has expired"
        await close_all(w0, old)

    asyncio.run(scenario())


def test_a_snapshot_request_from_an_unauthenticated_client_gets_nothing(
    ca: WorkerCA, other_ca: WorkerCA
) -> None:
    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(16, 16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    async def scenario() -> None:
        store = SnapshotStore()
        store.publish(3, model, optimizer)
        files = ca.issue("w0")
        replicator = Replicator(
            "w0", store, transport_factory=TcpTransport.secured(LinkTls(files, "w0"))
        )
        await replicator.start("127.0.0.1")
        answers: list[bytes] = []

        async def listener(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            answers.append(await reader.read())
            writer.close()

        sink = await asyncio.start_server(listener, "127.0.0.1", 0)
        sink_address = f"127.0.0.1:{sink.sockets[0].getsockname()[1]}"
        ask = frames(
            Hello(sender="w5"),
            SnapshotRequest(sender="w5", reply_to=sink_address, step=3, shards=1, index=0),
        )
        clients = [None, client_context(str(ca.ca_file), other_ca.issue("w5"))]
        for ctx in clients:  # plaintext, then a certificate of another CA
            assert await send_raw(replicator.address, ctx, ask) == b""
        # an authenticated newcomer asking the same gets the shard
        newcomer = await secure("w5", ca.issue("w5"))
        newcomer.transport.connect("w0", replicator.address)
        request = SnapshotRequest(sender="w5", reply_to=newcomer.address, step=3, shards=1, index=0)
        newcomer.transport.send("w0", request)
        await until(lambda: newcomer.got, "the shard")
        sender, message, payload = newcomer.got[0]
        assert sender == "w0" and isinstance(message, ShardData)
        assert len(payload) == store.get(3).layout.total_bytes > 0
        assert answers == [] and replicator.sent_bytes == {"w5": len(payload)}
        sink.close()
        await replicator.close()
        await close_all(newcomer)

    asyncio.run(scenario())


def test_reachable_handshakes_with_a_live_member_only(ca: WorkerCA) -> None:
    async def scenario() -> None:
        w0 = await secure("w0", ca.issue("w0"))
        w1 = await secure("w1", ca.issue("w1"))
        assert await w1.transport.reachable(w0.address, DEADLINE_S) is True
        await close_all(w0)
        assert await w1.transport.reachable(w0.address, DEADLINE_S) is False
        await close_all(w1)

    asyncio.run(scenario())


async def served_by(address: str, ctx: ssl.SSLContext) -> int:
    """The serial number of the certificate the server at `address` presents."""
    _, writer = await asyncio.open_connection(*parse_address(address), ssl=ctx)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
    return x509.load_der_x509_certificate(der).serial_number


async def shown_by(client: LinkTls, server: LinkTls) -> int:
    """The serial number of the certificate `client` presents to a server of `server`."""
    shown: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def handle(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        shown.set_result(writer.get_extra_info("ssl_object").getpeercert(binary_form=True))
        writer.close()

    listener = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server.server)
    try:
        port = listener.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client.client)
        der = await asyncio.wait_for(shown, DEADLINE_S)
        writer.close()
    finally:
        listener.close()
    return x509.load_der_x509_certificate(der).serial_number


def serial(files: TlsFiles) -> int:
    return x509.load_pem_x509_certificate(Path(files.cert).read_bytes()).serial_number


def test_renewed_files_are_taken_up_by_the_next_connection_both_ways(ca: WorkerCA) -> None:
    async def scenario() -> None:
        files = ca.issue("w0")
        first = serial(files)
        w0_tls = LinkTls(files, "w0")
        w0 = await start("w0", factory=TcpTransport.secured(w0_tls))
        w1 = LinkTls(ca.issue("w1"), "w1")
        assert await served_by(w0.address, w1.client) == first
        assert await shown_by(w0_tls, w1) == first
        renewed = serial(ca.issue("w0", days=60))  # the same paths: a swapped-in Secret
        assert renewed != first
        assert await served_by(w0.address, w1.client) == renewed  # as a server
        assert await shown_by(w0_tls, w1) == renewed  # as a client
        # files that name another member are not taken up: the renewed certificate stays
        ca.issue("w2")
        for suffix in ("crt", "key"):
            os.replace(ca.directory / f"w2.{suffix}", ca.directory / f"w0.{suffix}")
        assert not w0_tls.refresh()
        assert await served_by(w0.address, w1.client) == renewed
        assert w0_tls.me.member == "w0"
        await close_all(w0)

    asyncio.run(scenario())


def test_certificates_name_party_and_member_and_keys_are_private(ca: WorkerCA) -> None:
    files = ca.issue("w3")
    cert = x509.load_pem_x509_certificate(Path(files.cert).read_bytes())
    identity = identity_of(cert)
    assert identity is not None and (identity.party, identity.member) == ("local", "w3")
    assert member_uri("local", "w3") == "chaos://local/w3"
    for key in (files.key, ca.directory / "ca.key"):
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    tls = LinkTls(files, "w3")
    for ctx in (tls.server, tls.client):  # certificates required both ways; ids, no hosts
        assert ctx.verify_mode == ssl.CERT_REQUIRED and not ctx.check_hostname
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    with pytest.raises(TlsError, match="does not name member 'w4'"):
        LinkTls(files, "w4")
    for party, member in (("Not A Party", "w3"), ("local", "_seed"), ("local", "a/b")):
        with pytest.raises(ValueError):
            member_uri(party, member)


def run_report(tmp_path: Path, name: str, *extra: str, churn: str = "none") -> dict:
    """The report of a 3-worker float64 `chaos run` of 100 steps whose run directory is
    kept under `tmp_path` (`CHAOS_KEEP_RUN_DIR`)."""
    report = tmp_path / f"{name}.json"
    argv = ["run", "--quiet", "--workers", "3", "--steps", "100", "--dtype", "float64"]
    argv += ["--churn", churn, "--report", str(report), *extra]
    env = {**os.environ, "TMPDIR": str(tmp_path), "CHAOS_KEEP_RUN_DIR": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "chaos_cli.main", *argv],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(report.read_text())


def _worker_configs(tmp_path: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(tmp_path.glob("chaos-run-*/w*.json"))]


def test_a_run_over_mutual_tls_trains_exactly_as_a_plaintext_one(tmp_path: Path) -> None:
    (tmp_path / "tls").mkdir()
    (tmp_path / "plain").mkdir()
    secured = run_report(tmp_path / "tls", "tls")
    plain = run_report(tmp_path / "plain", "plain", "--insecure")
    tls_configs = _worker_configs(tmp_path / "tls")
    assert [c["id"] for c in tls_configs] == ["w0", "w1", "w2"]
    for config in tls_configs:
        cert = x509.load_pem_x509_certificate(Path(config["tls"]["cert"]).read_bytes())
        assert identity_of(cert).member == config["id"]
        assert stat.S_IMODE(os.stat(config["tls"]["key"]).st_mode) == 0o600
    assert [c["tls"] for c in _worker_configs(tmp_path / "plain")] == [None] * 3
    assert secured["steps"] == plain["steps"] == 100
    assert secured["problems"] == plain["problems"] == []
    assert secured["loss_curve"] == plain["loss_curve"]
    digests = {p["state_sha256"] for r in (secured, plain) for p in r["processes"]}
    assert len(digests) == 1 and None not in digests
