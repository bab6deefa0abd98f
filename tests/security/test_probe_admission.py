"""Downlink probes are answered only to newcomers that announced them, within a budget
(issue #15): an authenticated peer can no longer pull unbounded bytes as probe frames.

A real member (`Member`, real TLS 1.3 sockets, its inline replicator) takes a newcomer's
sealed `probe` proposal in through its gate, and its replicator then answers that
newcomer's probe (`join/probe.py`, the newcomer's own code), up to `PROBE_BUDGET_FRAMES`
frames per attempt. A member of its view, and a peer that announced no probe, get nothing.
Refusals are read from the member's `chaos_rejected_messages_total{reason}`.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
import torch
from chaos_operator.federation.workerca import WorkerCA
from chaos_worker.config import WorkerConfig
from chaos_worker.examples import EXAMPLES
from chaos_worker.join.probe import probe_downlinks
from chaos_worker.member import Member
from chaos_worker.membership.view import full_mesh, initial_view
from chaos_worker.net.signing import Signer
from chaos_worker.net.wire import ProbeData, ProbeRequest, Proposal
from chaos_worker.replication.admission import PROBE_BUDGET_FRAMES, PROBE_EVERY_S, Admissions
from chaos_worker.replication.replicator import Replicator
from chaos_worker.replication.snapshot import SnapshotStore
from chaos_worker.training.trainspec import load_trainspec

from tests.security.test_verified_state import forged_counter, rejected, secured
from tests.transportkit import Node, close_all, start, until

pytestmark = pytest.mark.security

CPU = torch.device("cpu")


def announce(ca: WorkerCA, name: str, address: str) -> Proposal:
    """`name`'s sealed `probe` proposal, as a newcomer's `_measure_downlinks` sends it."""
    proposal = Proposal(
        id=uuid.uuid4().hex,
        origin=name,
        kind="join",
        subject=name,
        address=address,
        detected_at=0.0,
        epoch=-1,
        mode="probe",
    )
    return Signer(ca.issue(name), name).seal(proposal)


async def newcomer(ca: WorkerCA, name: str) -> Node:
    return await start(name, factory=secured(ca.issue(name), name))


def ask(node: Node, replicator: str, frames: int) -> None:
    """A probe request of `frames` frames of 1 KiB from `node`."""
    node.transport.connect("w0", replicator)
    request = ProbeRequest(sender=node.name, reply_to=node.address, frames=frames, frame_bytes=1024)
    assert node.transport.send("w0", request)


def probe_frames(node: Node) -> int:
    return sum(isinstance(message, ProbeData) for _, message, _ in node.got)


def test_a_member_answers_the_probe_of_a_newcomer_that_announced_it_within_a_budget(
    ca: WorkerCA,
) -> None:
    config = WorkerConfig(
        id="w0",
        entry=EXAMPLES["mlp"],
        replicator="inline",
        metrics_port=0,
        members={"w0": "127.0.0.1:0", "w1": "127.0.0.1:1"},
        tls=ca.issue("w0"),
    )
    spec = load_trainspec(config.entry, seed=0, dtype=torch.float32, device=CPU)
    member = Member(config, spec, CPU)
    metrics = member.telemetry.metrics
    assert metrics is not None

    async def scenario() -> None:
        replicator = await member.replicator.start("127.0.0.1")
        address = f"127.0.0.1:{await member.transport.listen('127.0.0.1', 0)}"
        members = {"w0": address, "w1": "127.0.0.1:1"}
        member.membership.begin(initial_view(members, full_mesh(members)))
        w5, w1, w6 = [await newcomer(ca, name) for name in ("w5", "w1", "w6")]
        try:
            # w5 announces its probe to w0, as a newcomer does before it asks to join;
            # w1, a member of w0's view, announces one too, which w0 does not record
            for node in (w5, w1):
                node.transport.connect("w0", address)
                assert node.transport.send("w0", announce(ca, node.name, node.address))
            await until(lambda: member.store.admissions.probing("w5"), "w5's probe recorded")
            # the newcomer's own probe: a warm-up frame, then a train of 8 x 64 KiB
            w5_links = secured(ca.issue("w5"), "w5")
            measured = await probe_downlinks(
                "w5", {"w0": replicator}, transport_factory=w5_links, timeout_s=5.0
            )
            assert measured["w0"].complete and measured["w0"].nbytes == 8 * 64 * 1024
            assert rejected(metrics, "forged") == rejected(metrics, "unexpected") == 0
            # w1 (a member) and w6 (announced nothing) get no frame: both refused as forged
            ask(w1, replicator, 1)
            ask(w6, replicator, 1)
            await until(lambda: rejected(metrics, "forged") == 2, "two probes refused")
            # w5 may pull the rest of its attempt's budget, and not one frame more
            left = PROBE_BUDGET_FRAMES - 1 - 8
            ask(w5, replicator, left)
            await until(lambda: probe_frames(w5) == left, "the rest of w5's budget")
            ask(w5, replicator, 1)
            await until(lambda: rejected(metrics, "unexpected") == 1, "over budget")
            # a new attempt right after gets no new budget (one per PROBE_EVERY_S)
            assert w5.transport.send("w0", announce(ca, "w5", w5.address))
            ask(w5, replicator, 1)
            await until(lambda: rejected(metrics, "unexpected") == 2, "still over budget")
            assert probe_frames(w5) == left and probe_frames(w1) == probe_frames(w6) == 0
            assert member.store.admissions.probing("w1") is None  # a member: not recorded
            assert rejected(metrics, "forged") == 2
        finally:
            await close_all(w5, w1, w6)
            await member.replicator.close()
            await member.transport.close()

    asyncio.run(scenario())


def test_a_replicator_process_reads_the_announced_probes_from_the_directory(
    ca: WorkerCA, tmp_path: Path
) -> None:
    """The member records the probe in `admitted.json`; a replicator over the same
    directory (as a replicator process is) answers it and refuses the others, answering
    at most `MAX_PROBES` requests of a peer at once."""

    async def scenario() -> None:
        directory = tmp_path / "shm"
        trainer = SnapshotStore(directory)  # the member's side
        reject, metrics = forged_counter("w0")
        files = ca.issue("w0")
        served = Replicator(
            "w0",
            SnapshotStore(directory),  # the replicator process's side
            transport_factory=secured(files, "w0"),
            signer=Signer(files, "w0"),
            reject=reject,
            admission_wait_s=0.2,
        )
        replicator = await served.start("127.0.0.1")
        w5, w6 = await newcomer(ca, "w5"), await newcomer(ca, "w6")
        try:
            trainer.admissions.expect_probe("w5", "attempt-1", now=0.0)
            ask(w5, replicator, 4)
            for _ in range(3):  # the third while two wait for a record: too many at once
                ask(w6, replicator, 4)
            await until(lambda: probe_frames(w5) == 4, "w5's frames")
            await until(lambda: rejected(metrics) == 2, "w6 refused")
            assert rejected(metrics, "unexpected") == 1 and probe_frames(w6) == 0
        finally:
            await served.close()
            await close_all(w5, w6)

    asyncio.run(scenario())


def test_a_probe_attempt_is_recorded_once_per_proposal_and_per_interval() -> None:
    admissions = Admissions()
    assert admissions.probing("w5") is None
    admissions.expect_probe("w5", "a", now=100.0)
    admissions.expect_probe("w5", "b", now=100.0 + PROBE_EVERY_S / 2)  # too soon
    assert admissions.probing("w5") == "a"
    admissions.expect_probe("w5", "c", now=100.0 + PROBE_EVERY_S)
    assert admissions.probing("w5") == "c"
