"""Verified state (issue #15): a newcomer uses no byte of a state or a shard unless it matches
a digest sealed by the member whose snapshot it is, and a replicator serves snapshots only to
the newcomers its member admitted.

Real sockets and TLS 1.3 throughout, certificates of one run CA. The attacker w9 holds a
valid certificate: its links are authenticated, so only the seals and the admissions stand
between it and a newcomer. Refusals are observed on the real counter
(`chaos_rejected_messages_total{reason}`); "nothing was served" is checked once the refusal
is counted, which comes before any answer could. The honest outcome is checked by loading
what the newcomer took and comparing `state_digest` with the incumbents'.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from chaos_operator.federation.workerca import WorkerCA
from chaos_worker.config import TlsFiles
from chaos_worker.join.state import StateInbox
from chaos_worker.member import LinkOutbox
from chaos_worker.membership.view import full_mesh, initial_view
from chaos_worker.net.bounds import Rejections
from chaos_worker.net.signing import Signer, Verifier
from chaos_worker.net.tls import LinkTls
from chaos_worker.net.transport import TcpTransport
from chaos_worker.net.wire import (
    Cause,
    Decision,
    JoinPlan,
    Message,
    ShardData,
    SnapshotManifest,
    SnapshotRequest,
    StateTransfer,
    StateWitness,
)
from chaos_worker.replication.ledger import REFUSED_FILE, SentReader
from chaos_worker.replication.puller import JoinFailed, Puller, PullResult
from chaos_worker.replication.replicator import Replicator
from chaos_worker.replication.sidecar import start_child
from chaos_worker.replication.snapshot import (
    Layout,
    SnapshotStore,
    copy_into,
    layout_of,
    load_from,
    state_digest,
)
from chaos_worker.telemetry.metrics import WorkerMetrics

from tests.transportkit import Node, close_all, start, until

pytestmark = pytest.mark.security

STEP = 3


def job(seed: int = 0, steps: int = 2) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 8))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        model(torch.randn(4, 32)).square().sum().backward()
        optimizer.step()
    return model, optimizer


def saved(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> bytes:
    """A copy join's payload, as `JoinSponsor` makes it: the flat state."""
    layout, tensors = layout_of(model, optimizer)
    state = np.empty(layout.total_bytes, np.uint8)
    copy_into(state, layout, tensors)
    return state.tobytes()


def layout_json(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The layout a copy join's message carries for `saved(model, optimizer)`."""
    return layout_of(model, optimizer)[0].model_dump()


def forged_counter(name: str) -> tuple[Rejections, WorkerMetrics]:
    metrics = WorkerMetrics(name)
    return Rejections(metrics.observe_rejected), metrics


def rejected(metrics: WorkerMetrics, reason: str = "forged") -> float:
    value = metrics.registry.get_sample_value("chaos_rejected_messages_total", {"reason": reason})
    return value or 0.0


def secured(files: TlsFiles, name: str):
    return TcpTransport.secured(LinkTls(files, name))


def admitting(epoch: int = 4, members: tuple[str, ...] = ("w0", "w1", "w5", "w9")) -> Decision:
    """The decision of the view of `members` that admits w5 by a copy: its root (w0 by
    default) sends the state."""
    addresses = {m: f"127.0.0.1:{9000 + i}" for i, m in enumerate(members)}
    view = initial_view(addresses, full_mesh(addresses)).model_copy(update={"epoch": epoch})
    join = Cause(id="j5", kind="join", mode="copy", subject="w5", detected_at=1.0)
    return Decision(
        id="d4", origin=view.root, view=view, effective_step=20, immediate=False, causes=[join]
    )


def witness(name: str, ca: WorkerCA, model, optimizer, *, step: int = 20, epoch: int = 4):
    """`name`'s sealed word on the state of `step` for the decision of `epoch`."""
    word = StateWitness(
        sender=name, step=step, epoch=epoch, state_sha256=state_digest(model, optimizer)
    )
    return Signer(ca.issue(name), name).seal(word)


def test_a_forged_state_transfer_is_refused_counted_and_the_honest_state_taken(
    ca: WorkerCA,
) -> None:
    honest_model, honest_opt = job()
    honest, forged = saved(honest_model, honest_opt), saved(*job(seed=9))
    decision = admitting()

    async def scenario() -> None:
        reject, metrics = forged_counter("w5")
        inbox = StateInbox(Verifier(str(ca.ca_file)), reject)
        known: list[Decision | None] = [decision]
        arrived: list[str] = []

        def on_message(sender: str, message: Message, payload: bytes) -> None:
            if isinstance(message, StateTransfer):
                inbox.offer(sender, message, payload, hashlib.sha256(payload).hexdigest(), known[0])
                arrived.append(sender)

        w5_files = ca.issue("w5")
        w5 = TcpTransport(
            "w5", on_message, lambda *_: None, max_payload=1 << 24, tls=LinkTls(w5_files, "w5")
        )
        w5_address = f"127.0.0.1:{await w5.listen('127.0.0.1', 0)}"
        w0_files, w9_files = ca.issue("w0"), ca.issue("w9")
        w0 = await start("w0", factory=secured(w0_files, "w0"))
        w9 = await start("w9", factory=secured(w9_files, "w9"))
        try:
            w0.transport.connect("w5", w5_address)
            w9.transport.connect("w5", w5_address)
            w0_seal, w9_seal = Signer(w0_files, "w0").seal, Signer(w9_files, "w9").seal

            def state(sender: str, blob: bytes, epoch: int = 4) -> StateTransfer:
                digest = hashlib.sha256(blob).hexdigest()  # the sender's own digest
                layout = layout_json(honest_model, honest_opt)  # the same model's, both
                return StateTransfer(
                    sender=sender, step=20, epoch=epoch, layout=layout, sha256=digest
                )

            genuine = w0_seal(state("w0", honest))
            by_w9 = [
                (state("w9", forged), forged),  # a self-computed digest, no seal
                (w9_seal(state("w9", forged)), forged),  # sealed, but w0 sends this state
                (state("w0", forged), forged),  # in w0's name, unsealed
                (genuine, forged),  # w0's genuine seal, relayed, on other bytes
            ]
            by_w0 = [
                (genuine, forged),  # w0's own link, bytes that do not match its seal
                (w0_seal(state("w0", forged, epoch=3)), forged),  # an old join's state
            ]
            for message, payload in by_w9:
                assert w9.transport.send("w5", message, payload)
            for message, payload in by_w0:
                assert w0.transport.send("w5", message, payload)
            # the sponsor's own path: the outbox seals the state as w0's word
            outbox = LinkOutbox("w0", w0.transport, None, Signer(w0_files, "w0"))  # type: ignore[arg-type]
            assert outbox.send("w5", state("w0", honest), honest)
            await until(lambda: len(arrived) == 7, "every state")
            assert rejected(metrics) == 6
            # the state waits for the word of its witness, w1 (the smallest other member)
            assert inbox.take(decision) is None
            assert inbox.witness("w1", witness("w1", ca, honest_model, honest_opt))
            message, blob = inbox.take(decision)
            assert message.sender == "w0" and message.seal is not None and blob == honest
            # before the decision is known, a state sealed by a member is held; the
            # decision it was not sent for refuses it when the state is taken
            known[0] = None
            assert w9.transport.send("w5", w9_seal(state("w9", forged)), forged)
            await until(lambda: len(arrived) == 8, "w9's state")
            assert rejected(metrics) == 6
            assert inbox.take(decision) is None
            assert rejected(metrics) == 7
        finally:
            await w5.close()
            await close_all(w0, w9)
        loaded_model, loaded_opt = job(seed=5, steps=0)
        layout = Layout.model_validate(message.layout)
        load_from(blob, layout, loaded_model, loaded_opt, torch.device("cpu"))
        assert state_digest(loaded_model, loaded_opt) == state_digest(honest_model, honest_opt)

    asyncio.run(scenario())


async def replicator(
    name: str, ca: WorkerCA, model, optimizer, *, seal: bool = True, corrupt: bool = False
) -> Replicator:
    """A member's replicator over TLS serving snapshot `STEP` of (`model`, `optimizer`),
    its member having admitted w5 to pull it."""
    store = SnapshotStore()
    store.publish(STEP, model, optimizer)
    store.want(STEP, joiner="w5")
    files = ca.issue(name)
    served = Replicator(
        name,
        store,
        transport_factory=secured(files, name),
        signer=Signer(files, name) if seal else None,
        corrupt_once=corrupt,
    )
    await served.start("127.0.0.1")
    return served


def test_a_forged_manifest_or_shard_is_refused_counted_and_the_pull_ends_honest(
    ca: WorkerCA,
) -> None:
    """w9's replicator serves a forged snapshot with a manifest of digests it computed
    itself (unsealed); w1's flips a byte of the first shard it sends. The manifest is
    asked of w9 first."""
    model, opt = job()
    forged_model, forged_opt = job(seed=9)

    async def scenario():
        sources = {
            "w0": await replicator("w0", ca, model, opt),
            "w1": await replicator("w1", ca, model, opt, corrupt=True),
            "w9": await replicator("w9", ca, forged_model, forged_opt, seal=False),
        }
        total = sources["w0"].store.get(STEP).layout.total_bytes
        assert sources["w9"].store.get(STEP).layout.total_bytes == total
        plan = pull_plan(sources, total)
        reject, metrics = forged_counter("w5")
        puller = Puller(
            "w5",
            plan,
            transport_factory=secured(ca.issue("w5"), "w5"),
            verifier=Verifier(str(ca.ca_file)),
            reject=reject,
        )
        try:
            result = await puller.run()
        finally:
            for served in sources.values():
                await served.close()
        return result, metrics, puller.manifest

    result, metrics, manifest = asyncio.run(scenario())
    assert rejected(metrics) == 2  # w9's manifest, w1's flipped shard
    assert result.rejected == 1
    assert manifest.sender in ("w0", "w1") and manifest.seal is not None
    assert result.bytes_per_source["w9"] == 0
    fresh_model, fresh_opt = job(seed=5, steps=0)
    load_from(result.data, result.layout, fresh_model, fresh_opt, torch.device("cpu"))
    assert state_digest(fresh_model, fresh_opt) == state_digest(model, opt)


def test_a_snapshot_request_from_a_member_not_admitted_is_refused_and_counted(
    ca: WorkerCA, tmp_path: Path
) -> None:
    """The replicator reads its member's admissions from the snapshot directory, as a
    replicator process does."""
    model, opt = job()

    async def scenario() -> None:
        directory = tmp_path / "snapshots"
        trainer = SnapshotStore(directory)  # the member's side: it publishes and admits
        trainer.publish(STEP, model, opt)
        trainer.want(STEP, shards=2, joiner="w5")
        reject, metrics = forged_counter("w0")
        files = ca.issue("w0")
        served = Replicator(
            "w0",
            SnapshotStore(directory),  # the replicator process's side: it reads the files
            transport_factory=secured(files, "w0"),
            signer=Signer(files, "w0"),
            reject=reject,
            admission_wait_s=0.2,
        )
        await served.start("127.0.0.1")
        w5 = await start("w5", factory=secured(ca.issue("w5"), "w5"))
        w6 = await start("w6", factory=secured(ca.issue("w6"), "w6"))

        def ask(node: Node, step: int = STEP, index: int | None = None) -> None:
            request = SnapshotRequest(
                sender=node.name, reply_to=node.address, step=step, shards=2, index=index
            )
            node.transport.connect("w0", served.address)
            assert node.transport.send("w0", request)

        try:
            # an authenticated member that is no admitted newcomer, for itself or for w5
            ask(w6)
            ask(w6, index=0)
            w6.transport.connect("w0", served.address)
            reflect = SnapshotRequest(
                sender="w5", reply_to=w5.address, step=STEP, shards=2, index=1
            )
            assert w6.transport.send("w0", reflect)
            # the admitted newcomer, for a snapshot it was not admitted to pull
            ask(w5, step=STEP - 1, index=1)
            await until(lambda: rejected(metrics) == 4, "four refusals")
            assert w6.got == [] and w5.got == [] and served.sent_bytes == {}
            # the admitted newcomer gets the manifest, sealed by w0, and a shard
            ask(w5)
            ask(w5, index=1)
            await until(lambda: len(w5.got) == 2, "the manifest and the shard")
            replies = {type(message): message for _, message, _ in w5.got}
            assert {sender for sender, _, _ in w5.got} == {"w0"}
            assert Verifier(str(ca.ca_file)).check(replies[SnapshotManifest]) is None
            assert ShardData in replies and served.sent_bytes["w5"] > 0
            # once the join is over, w5 is admitted no longer
            trainer.release(STEP)
            ask(w5, index=0)
            await until(lambda: rejected(metrics) == 5, "the fifth refusal")
            assert len(w5.got) == 2 and w6.got == []
        finally:
            await served.close()
            await close_all(w5, w6)

    asyncio.run(scenario())


def test_a_replicator_process_serves_admitted_newcomers_and_counts_the_others(
    ca: WorkerCA, tmp_path: Path
) -> None:
    """The trainer's own replicator process (`start_child`, as a member starts it): it
    reads the admissions from the directory, and its member's metrics count its refusals
    (`REFUSED_FILE`)."""
    model, opt = job()

    async def scenario() -> None:
        directory = tmp_path / "shm"
        trainer = SnapshotStore(directory)
        trainer.publish(STEP, model, opt)
        trainer.want(STEP, joiner="w5")
        child = await start_child("w0", directory, "127.0.0.1", tls=ca.issue("w0"))
        refused = SentReader(directory, REFUSED_FILE)
        counted: dict[str, int] = {}

        def refusals() -> bool:
            counted.update(refused.news())
            return bool(counted)

        w5 = await start("w5", factory=secured(ca.issue("w5"), "w5"))
        w6 = await start("w6", factory=secured(ca.issue("w6"), "w6"))
        try:
            for node in (w6, w5):
                request = SnapshotRequest(
                    sender=node.name, reply_to=node.address, step=STEP, shards=1, index=0
                )
                node.transport.connect("w0", child.address)
                assert node.transport.send("w0", request)
            await until(lambda: len(w5.got) == 1, "w5's shard")
            assert isinstance(w5.got[0][1], ShardData)
            await until(refusals, "w6's refusal")
            assert counted == {"forged": 1} and w6.got == []
        finally:
            await close_all(w5, w6)
            await child.stop()

    asyncio.run(scenario())


def pull_plan(sources: dict[str, Replicator], total: int) -> JoinPlan:
    """w5's pull of snapshot `STEP`, two shards a source, the manifest asked of w9 first."""
    return JoinPlan(
        id="p",
        origin="w0",
        joiner="w5",
        joiner_address="127.0.0.1:1",  # never connected to here
        step=STEP,
        state_bytes=total,
        shards=2 * len(sources),
        assignment={s: [2 * i, 2 * i + 1] for i, s in enumerate(sorted(sources))},
        replicators={s: r.address for s, r in sources.items()},
        bandwidths={s: 1e8 for s in sources},
        manifest_from="w9",
        predicted_s=0.1,
        strategy="equal",
    )


async def pull_from(ca: WorkerCA, sources: dict[str, Replicator], quorum: int = 1):
    """w5 pulls from `sources` over TLS, with that state quorum; (the result or the
    JoinFailed, metrics, puller)."""
    total = next(iter(sources.values())).store.get(STEP).layout.total_bytes
    reject, metrics = forged_counter("w5")
    puller = Puller(
        "w5",
        pull_plan(sources, total),
        transport_factory=secured(ca.issue("w5"), "w5"),
        verifier=Verifier(str(ca.ca_file)),
        reject=reject,
        quorum=quorum,
    )
    try:
        outcome: PullResult | JoinFailed = await puller.run()
    except JoinFailed as failed:
        outcome = failed
    finally:
        for served in sources.values():
            await served.close()
    return outcome, metrics, puller


async def pull_with_w9_forging(ca: WorkerCA, honest: list[str], model, opt):
    """w5 pulls from `honest` sources of (`model`, `opt`) and from w9, which seals a
    snapshot of a state of its own in its own name."""
    sources = {name: await replicator(name, ca, model, opt) for name in honest}
    sources["w9"] = await replicator("w9", ca, *job(seed=9))
    return await pull_from(ca, sources)


def test_a_hostile_source_sealing_its_own_forged_snapshot_is_outvoted(ca: WorkerCA) -> None:
    """w9 seals, in its own name, a manifest of a state of its own whose shards agree with
    it: the seal holds, but w0 and w1 seal the honest digests, so w9's manifest is refused
    as forged, its shards are never placed and the pull ends on the incumbents' state."""
    model, opt = job()
    result, metrics, puller = asyncio.run(pull_with_w9_forging(ca, ["w0", "w1"], model, opt))
    assert isinstance(result, PullResult), result
    assert rejected(metrics) == 1  # w9's manifest, outvoted
    assert puller.manifest.sender in ("w0", "w1")
    assert result.bytes_per_source["w9"] == 0
    fresh_model, fresh_opt = job(seed=5, steps=0)
    load_from(result.data, result.layout, fresh_model, fresh_opt, torch.device("cpu"))
    assert state_digest(fresh_model, fresh_opt) == state_digest(model, opt)


def test_two_sources_that_seal_different_snapshots_fail_the_pull(ca: WorkerCA) -> None:
    """With only w0 and w9, nobody can tell which of two sealed manifests is the honest
    one: the pull fails (the join then asks again, by a full copy through another member)
    and places nothing."""
    model, opt = job()
    failed, _, puller = asyncio.run(pull_with_w9_forging(ca, ["w0"], model, opt))
    assert isinstance(failed, JoinFailed)
    assert "no 2 sources sealed the same manifest" in str(failed)
    assert puller.manifest is None and not puller.done


def test_a_state_source_sealing_its_own_forged_state_fails_its_witness(ca: WorkerCA) -> None:
    """The decision's state source w0 seals a forged state of its own: every check of the
    state itself passes, but w1, the witness, vouches for the incumbents' state, and the
    state loaded is not that one; unsealed or misnamed witnesses are refused."""
    honest_model, honest_opt = job()
    forged_model, forged_opt = job(seed=9)
    decision = admitting()
    reject, metrics = forged_counter("w5")
    inbox = StateInbox(Verifier(str(ca.ca_file)), reject)
    blob = saved(forged_model, forged_opt)
    digest = hashlib.sha256(blob).hexdigest()
    sealed = Signer(ca.issue("w0"), "w0").seal(
        StateTransfer(
            sender="w0",
            step=20,
            epoch=4,
            layout=layout_json(forged_model, forged_opt),
            sha256=digest,
        )
    )
    assert inbox.offer("w0", sealed, blob, digest, decision)
    word = witness("w1", ca, honest_model, honest_opt)
    assert not inbox.witness("w9", word)  # relayed by another: refused
    assert not inbox.witness("w1", word.model_copy(update={"seal": None}))  # unsealed
    assert rejected(metrics) == 2
    assert inbox.take(decision) is None  # no witness's word yet
    assert inbox.witness("w1", witness("w1", ca, honest_model, honest_opt, step=19))
    assert inbox.take(decision) is None  # a word on another step is not one on this state
    assert inbox.witness("w1", word)
    message, taken = inbox.take(decision)
    assert taken == blob  # every check of the state itself passes
    loaded_model, loaded_opt = job(seed=5, steps=0)
    layout = Layout.model_validate(message.layout)
    load_from(taken, layout, loaded_model, loaded_opt, torch.device("cpu"))
    vouched = inbox.vouched(decision, message)
    assert vouched == state_digest(honest_model, honest_opt)
    assert state_digest(loaded_model, loaded_opt) != vouched  # the newcomer refuses it


@pytest.mark.parametrize("quorum", [1, 2])
def test_a_quorum_of_two_believes_no_lone_source(ca: WorkerCA, quorum: int) -> None:
    """w9, in a decision it sealed itself, names itself the only source of a snapshot of a
    state of its own: a newcomer cannot tell that plan from an honest one of a job with a
    single incumbent. With the default quorum it takes w9's state (the limit
    `docs/security.md` states); with a quorum of 2 the pull fails and places nothing."""

    async def lone_w9():
        return await pull_from(ca, {"w9": await replicator("w9", ca, *job(seed=9))}, quorum)

    outcome, _, puller = asyncio.run(lone_w9())
    if quorum == 1:
        assert isinstance(outcome, PullResult), outcome
        fresh_model, fresh_opt = job(seed=5, steps=0)
        load_from(outcome.data, outcome.layout, fresh_model, fresh_opt, torch.device("cpu"))
        assert state_digest(fresh_model, fresh_opt) == state_digest(*job(seed=9))
    else:
        assert isinstance(outcome, JoinFailed)
        assert "no 2 sources sealed the same manifest" in str(outcome)
        assert puller.manifest is None and not puller.done


def test_a_quorum_of_two_takes_no_copy_that_nobody_else_can_vouch_for(ca: WorkerCA) -> None:
    """A copy decision whose view holds no member beside its state source and the joiner
    (a single incumbent, or w9's forged view of itself) has no witness: a quorum of 2
    refuses it before any state is waited for; a view with a witness is taken as before."""
    verifier = Verifier(str(ca.ca_file))
    lone = admitting(members=("w9", "w5"))
    strict = StateInbox(verifier, forged_counter("w5")[0], quorum=2)
    assert "names no member beside w9 to vouch for the state" in strict.unvouched(lone)
    assert strict.unvouched(admitting()) is None  # w1 is its witness
    assert StateInbox(verifier, forged_counter("w5")[0]).unvouched(lone) is None


def test_a_state_is_read_into_a_buffer_of_the_inboxs_own_and_loads_in_place(
    ca: WorkerCA,
) -> None:
    """Over a real TLS link, the receiver reads a state's payload into the inbox's buffer
    (`StateInbox.place`); the newcomer loads that writable buffer in place, with no copy of
    a read-only payload. A payload read anywhere else is handed on as it came."""
    model, opt = job()
    blob = saved(model, opt)
    layout = layout_json(model, opt)
    message = StateTransfer(
        sender="w0", step=20, epoch=4, layout=layout, sha256=hashlib.sha256(blob).hexdigest()
    )
    inbox = StateInbox(Verifier(str(ca.ca_file)), forged_counter("w5")[0])
    got: list[object] = []

    async def scenario() -> None:
        w5_files, w0_files = ca.issue("w5"), ca.issue("w0")

        def on_message(sender: str, received: Message, payload: bytes) -> None:
            if isinstance(received, StateTransfer):
                got.append(inbox.writable(sender, received, payload))

        w5 = TcpTransport(
            "w5", on_message, lambda *_: None, max_payload=1 << 24, tls=LinkTls(w5_files, "w5")
        )
        w5.place = lambda sender, received, nbytes: inbox.place(sender, received, nbytes)
        address = f"127.0.0.1:{await w5.listen('127.0.0.1', 0)}"
        w0 = await start("w0", factory=secured(w0_files, "w0"))
        try:
            w0.transport.connect("w5", address)
            assert w0.transport.send("w5", message, blob)
            await until(lambda: len(got) == 1, "the state")
        finally:
            await w5.close()
            await close_all(w0)

    asyncio.run(scenario())
    placed = got[0]
    assert isinstance(placed, np.ndarray) and placed.flags.writeable
    assert placed.tobytes() == blob
    elsewhere = memoryview(blob)  # read to the transport's own buffer: handed on as it came
    assert inbox.writable("w0", message, elsewhere) is elsewhere
    inbox.place("w0", message, len(blob))
    assert inbox.writable("w0", message, elsewhere) is elsewhere  # not the placed buffer
    fresh, fresh_opt = job(seed=5, steps=0)
    load_from(placed, Layout.model_validate(layout), fresh, fresh_opt, torch.device("cpu"))
    moment = fresh_opt.state[fresh_opt.param_groups[0]["params"][0]]["exp_avg"]
    assert np.shares_memory(moment.numpy(), placed)  # loaded in place
    assert state_digest(fresh, fresh_opt) == state_digest(model, opt)
