"""Forged membership messages (issue #15, "Authorization in the protocol").

The attacker w9 is a member with a real certificate of the run's CA: its link is mutual TLS
and authenticated. It forges flooded messages in others' names (a leave of w1, a crash "from
w1", a decision not from the root, a heartbeat of w1) and relays genuine ones. The victim
w0 guards its links as a member does (`net.signing.Gate`) and forwards what it admits to w2,
so "not forwarded" is observed on a real link: the forgeries go first on w9's FIFO link, the
genuine messages last, and once w2 has those, every forgery was already handled. A real
`chaos run` over TLS (every flooded message sealed and checked) trains bit for bit as one
with `--insecure`.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import math
import os
from pathlib import Path

import pytest
from chaos_operator.federation.workerca import WorkerCA
from chaos_worker.config import SIGNATURE
from chaos_worker.member import LinkOutbox
from chaos_worker.membership.rules import undue_decision
from chaos_worker.membership.view import View, full_mesh, initial_view
from chaos_worker.net.bounds import Rejections
from chaos_worker.net.signing import Gate, Signer, Verifier, canonical
from chaos_worker.net.tls import LinkTls
from chaos_worker.net.transport import TcpTransport
from chaos_worker.net.wire import Decision, Heartbeat, Message, Proposal, Seal, WireMessage
from chaos_worker.telemetry.metrics import WorkerMetrics
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.cluster.test_run import run_until_joined
from tests.transportkit import Node, close_all, start, until

pytestmark = pytest.mark.security

MEMBERS = ("w0", "w1", "w2", "w9")
CRASH_STEP = 40
CHURN = f"crash:w1@{CRASH_STEP},join@60"
LONG = 1_000_000
"""Steps of a run that ends once its newcomer trained, not at a fixed step."""


def view(epoch: int = 3, members: tuple[str, ...] = MEMBERS) -> View:
    addresses = {m: f"127.0.0.1:{9000 + i}" for i, m in enumerate(members)}
    base = initial_view(addresses, full_mesh(members))
    return base.model_copy(update={"epoch": epoch})


def heartbeat(origin: str, seq: int = 1, step: int = 10) -> Heartbeat:
    return Heartbeat(origin=origin, seq=seq, epoch=3, step=step, samples_per_s=1.0, sent_at=1.0)


def proposal(origin: str, kind: str, subject: str, key: str) -> Proposal:
    return Proposal(id=key, origin=origin, kind=kind, subject=subject, detected_at=1.0, epoch=3)


def sealed_by(files, message: WireMessage) -> WireMessage:
    """`message` sealed with the key of `files`, whatever origin it names (a forgery)."""
    key = serialization.load_pem_private_key(Path(files.key).read_bytes(), None)
    cert = x509.load_pem_x509_certificate(Path(files.cert).read_bytes())
    der = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
    sig = base64.b64encode(key.sign(canonical(message), SIGNATURE)).decode()
    return message.model_copy(update={"seal": Seal(cert=der, sig=sig)})


class Guarded:
    """A member's inbound path: the gate, then act (record) and forward to every peer."""

    def __init__(self, name: str, ca_file: str, known: list[View]) -> None:
        self.metrics = WorkerMetrics(name)
        self.gate = Gate(
            Verifier(ca_file), Rejections(self.metrics.observe_rejected), lambda: known
        )
        self.node: Node | None = None
        self.acted: list[Message] = []

    def on_message(self, sender: str, message: Message, _payload: bytes) -> None:
        if not self.gate.admit(sender, message):
            return
        self.acted.append(message)
        for peer in self.node.transport.peers():
            self.node.transport.send(peer, message)

    def forged(self) -> float:
        value = self.metrics.registry.get_sample_value(
            "chaos_rejected_messages_total", {"reason": "forged"}
        )
        return value or 0.0


async def guarded_node(name: str, ca: WorkerCA, known: list[View]) -> Guarded:
    guarded = Guarded(name, str(ca.ca_file), known)
    tls = LinkTls(ca.issue(name), name)
    transport = TcpTransport(
        name, guarded.on_message, lambda _peer, _graceful: None, max_payload=1 << 20, tls=tls
    )
    port = await transport.listen("127.0.0.1", 0)
    guarded.node = Node(name, transport, f"127.0.0.1:{port}")
    return guarded


def test_forgeries_of_an_authenticated_member_are_refused_counted_and_not_forwarded(
    ca: WorkerCA,
) -> None:
    async def scenario() -> None:
        known = [view()]
        w0 = await guarded_node("w0", ca, known)
        w2 = await guarded_node("w2", ca, known)
        w9_files = ca.issue("w9")
        w9 = await start("w9", factory=TcpTransport.secured(LinkTls(w9_files, "w9")))
        w1 = Signer(ca.issue("w1"), "w1")
        w9_signer = Signer(w9_files, "w9")
        try:
            w0.node.transport.connect("w2", w2.node.address)
            w9.transport.connect("w0", w0.node.address)
            root = known[0].root
            assert root == "w0"
            not_root = Decision(
                id="d-forged",
                origin="w9",
                view=view(epoch=4, members=("w0", "w2", "w9")),  # w1 dropped
                effective_step=20,
                immediate=False,
            )
            genuine_beat = w1.seal(heartbeat("w1", seq=7))
            forgeries = [
                # (a) a leave of w1: unsigned, sealed by w9 in w1's name, and as w9's own
                proposal("w1", "leave", "w1", "leave-a1"),
                sealed_by(w9_files, proposal("w1", "leave", "w1", "leave-a2")),
                w9_signer.seal(proposal("w9", "leave", "w1", "leave-a3")),
                # (b) a crash proposal "from w1"
                proposal("w1", "crash", "w2", "crash-b1"),
                sealed_by(w9_files, proposal("w1", "crash", "w2", "crash-b2")),
                # (c) a decision not from the root: sealed by w9 (its own), and in w0's name
                w9_signer.seal(not_root),
                sealed_by(w9_files, not_root.model_copy(update={"origin": root, "id": "d-2"})),
                # (d) a heartbeat of w1: unsigned, sealed by w9, and w1's genuine one altered
                heartbeat("w1", seq=1),
                sealed_by(w9_files, heartbeat("w1", seq=2)),
                genuine_beat.model_copy(update={"step": 99}),
            ]
            genuine = [w1.seal(proposal("w1", "leave", "w1", "leave-genuine")), genuine_beat]
            for message in [*forgeries, *genuine]:
                assert w9.transport.send("w0", message)
            await until(lambda: genuine[-1] in w2.acted, "the last message at w2")
            assert w0.forged() == len(forgeries)
            assert w0.acted == genuine  # relayed by w9: fine; the forgeries: not acted on
            assert w2.acted == genuine  # forwarded unchanged (w2's gate checked them again)
            assert w2.forged() == 0
            assert all(m.seal is not None for m in w2.acted)
        finally:
            await close_all(w0.node, w2.node, w9)

    asyncio.run(scenario())


def test_a_decision_comes_from_the_root_or_for_a_recovery_a_member_of_the_view_it_replaces():
    base = view()
    planned = Decision(id="d", origin="w0", view=view(epoch=4), effective_step=5, immediate=False)
    assert undue_decision(planned, [base]) is None
    # the root decides a view with another root (or without itself): still the root's
    moved = view(epoch=4, members=("w1", "w2", "w9"))
    assert moved.root != "w0"
    assert undue_decision(planned.model_copy(update={"view": moved}), [base]) is None
    assert "not the root" in undue_decision(planned.model_copy(update={"origin": "w2"}), [base])
    # a recovery: the coordinator of the surviving side, any member of the replaced view
    recovery = planned.model_copy(update={"origin": "w2", "immediate": True})
    assert undue_decision(recovery, [base]) is None
    stranger = recovery.model_copy(update={"origin": "w7"})
    assert "not a member" in undue_decision(stranger, [base])
    # behind (no view of epoch 4 known) or not training: what can be judged is judged
    later = stranger.model_copy(update={"view": view(epoch=6)})
    assert "no view known" in undue_decision(later, [base])
    assert undue_decision(later.model_copy(update={"origin": "w9"}), [base]) is None
    assert undue_decision(stranger, []) is None


def _chaos_run(tmp_path: Path, *extra: str) -> tuple[dict, str]:
    """A run with a crash and a join, ended once the newcomer trained; its report and its
    workers' stderr."""
    tmp_path.mkdir()
    argv = ["run", "--quiet", "--workers", "3", "--steps", str(LONG), "--dtype", "float64"]
    report = run_until_joined(tmp_path, [*argv, "--churn", CHURN, *extra])
    logs = sorted(tmp_path.glob("chaos-run-*/w*.stderr"))  # warnings and up
    assert len(logs) == 4  # w0..w2 and the newcomer
    return report, "".join(p.read_text(errors="replace") for p in logs)


def test_a_run_with_sealed_messages_trains_as_a_plaintext_one(tmp_path: Path) -> None:
    """Bit for bit up to the crash. After it the losses may differ in the last bit between
    any two runs, plaintext ones too (the step a crash is detected at, and so how the batch
    is split and summed, depends on timing), so from there they are compared to 1e-12.
    Each run ends once its newcomer trained, so they are compared over the steps both made."""
    sealed, sealed_logs = _chaos_run(tmp_path / "tls")
    plain, _ = _chaos_run(tmp_path / "plain", "--insecure")
    for report in (sealed, plain):  # the crash and the join both happened
        assert report["problems"] == [f"only {report['steps']} of {LONG} steps completed"]
        assert [e["type"] for e in report["events"]] == ["crash", "join"]
        assert report["members_curve"][-1][1] == 3
        assert [s for s, _ in report["loss_curve"]] == list(range(report["steps"]))
    both = min(sealed["steps"], plain["steps"])
    losses, plain_losses = sealed["loss_curve"][:both], plain["loss_curve"][:both]
    assert losses[:CRASH_STEP] == plain_losses[:CRASH_STEP]
    assert all(
        math.isclose(a, b, rel_tol=1e-12)
        for (_, a), (_, b) in zip(losses, plain_losses, strict=True)
    )
    assert "(forged)" not in sealed_logs  # every genuine message was admitted


class Recording:
    """A transport stand-in for `LinkOutbox`: two peers, every frame queued recorded."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, WireMessage]] = []

    def peers(self) -> list[str]:
        return ["w1", "w2"]

    def send(self, peer: str, message: WireMessage, _payload: bytes = b"") -> bool:
        self.sent.append((peer, message))
        return True


def test_a_member_seals_what_it_makes_once_and_forwards_the_others_unchanged(ca: WorkerCA):
    files = ca.issue("w0")
    transport = Recording()
    outbox = LinkOutbox("w0", transport, None, Signer(files, "w0"))  # type: ignore[arg-type]
    relayed = Signer(ca.issue("w1"), "w1").seal(heartbeat("w1"))
    outbox.flood(heartbeat("w0"))
    outbox.flood(relayed)
    outbox.send("w1", proposal("w0", "leave", "w0", "leave-w0"))
    own = [m for _, m in transport.sent[:2]]
    assert own[0] is own[1] and own[0].seal is not None  # signed once for every link
    assert [m for _, m in transport.sent[2:4]] == [relayed, relayed]
    verifier = Verifier(files.ca)
    assert [verifier.check(m) for _, m in transport.sent] == [None] * 5
    bare = Recording()
    LinkOutbox("w0", bare, None).flood(heartbeat("w0"))  # type: ignore[arg-type]
    assert all(m.seal is None for _, m in bare.sent)  # no TLS: nothing sealed


def test_a_seal_needs_a_valid_certificate_of_the_run_ca_naming_the_origin(
    ca: WorkerCA, tmp_path: Path
) -> None:
    verifier = Verifier(str(ca.ca_file))
    other = WorkerCA(tmp_path / "other-ca", "local").issue("w1")
    assert "no CA of the bundle" in verifier.check(Signer(other, "w1").seal(heartbeat("w1")))
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
    expired = ca.issue("w1", days=1, not_before=past)
    assert "outside its validity" in verifier.check(Signer(expired, "w1").seal(heartbeat("w1")))
    # renewed files (new key, new certificate) are taken up by the next seal
    signer = Signer(ca.issue("w1"), "w1")
    before = signer.seal(heartbeat("w1", seq=1))
    os.utime(ca.issue("w1").key, ns=(1, 1))  # a changed stamp even within one mtime tick
    after = signer.seal(heartbeat("w1", seq=2))
    assert before.seal.cert != after.seal.cert
    assert verifier.check(before) is None and verifier.check(after) is None
