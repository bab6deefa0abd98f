"""The pure federation rules: who seeds, who joins whom, admission limits, the status of a
job and of a ChaosPeer, and what a party tells its peers."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
from chaos_cli.main import main
from chaos_operator.api import ChaosPeer
from chaos_operator.federation import identity as ident
from chaos_operator.federation.protocol import FederationInfo, SyncMessage
from chaos_operator.federation.rules import (
    ExchangeOutcome,
    FederationView,
    PeerRecord,
    PublishedJob,
    RemoteParty,
    job_view,
    outgoing,
    peer_status,
    status_unchanged,
)
from chaos_operator.pods import LABEL_MEMBER, Options
from chaos_operator.reconcile import reconcile
from chaos_worker.config import WorkerConfig

from tests.unit.test_reconcile import NOW, World, config_of, make_job

pytestmark = pytest.mark.unit

FED = Options(party="beta")
A_MEMBERS = {"alpha.digits-w0": "10.0.0.1:7070", "alpha.digits-w1": "10.0.0.1:7073"}


def view(*remotes: RemoteParty, party: str = "beta", **kw) -> FederationView:
    return FederationView(party=party, remotes=remotes, peers=len(remotes), **kw)


def alpha(members=A_MEMBERS, replicas: int = 2, **kw) -> RemoteParty:
    return RemoteParty(party="alpha", members=dict(members), replicas=replicas,
                       admits_us=kw.pop("admits_us", True), **kw)  # fmt: skip


def conditions(plan) -> dict[str, dict]:
    return {c["type"]: c for c in plan.status["conditions"]}


def test_ids_carry_the_party_when_federated() -> None:
    plan = reconcile(make_job(2), [], now=NOW, options=FED, federation=view())
    config = config_of(plan.create[0])
    assert config["id"] == "beta.digits-w0"
    assert set(config["members"]) == {"beta.digits-w0", "beta.digits-w1"}
    pod = plan.create[0]
    assert pod["metadata"]["name"] == "digits-w0"  # pods and host names keep their names
    assert pod["spec"]["hostname"] == "digits-w0"
    assert pod["metadata"]["labels"][LABEL_MEMBER] == "beta.digits-w0"
    WorkerConfig.model_validate(config)


def test_a_party_without_members_joins_through_a_remote_member() -> None:
    plan = reconcile(make_job(2), [], now=NOW, options=FED, federation=view(alpha()))
    configs = [config_of(p) for p in plan.create]
    assert [c["join"] for c in configs] == ["10.0.0.1:7070"] * 2  # alpha's smallest id
    assert all("members" not in c for c in configs)
    assert "alpha.digits-w0 of party alpha" in plan.events["digits-w0"].message
    assert plan.status["remoteMembers"] == 2
    assert conditions(plan)["FederationSynced"]["status"] == "True"


def test_local_members_stay_the_seed_when_there_are_some() -> None:
    world = World(2, FED)
    world.step()
    world.run_all()
    world.pods.pop("digits-w1")
    plan = reconcile(world.job, list(world.pods.values()), now=NOW, options=FED,
                     federation=view(alpha()))  # fmt: skip
    assert config_of(plan.create[0])["join"] == world.pods["digits-w0"].address


def test_a_remote_that_does_not_admit_us_is_no_seed() -> None:
    plan = reconcile(make_job(2), [], now=NOW, options=FED,
                     federation=view(alpha(admits_us=False, we_admit=False)))  # fmt: skip
    assert all("members" in config_of(p) for p in plan.create)  # an initial set of our own
    assert plan.status["remoteMembers"] == 0


def test_with_no_member_anywhere_the_smallest_party_seeds() -> None:
    # beta waits for alpha, which wants workers and admits beta ...
    waiting = reconcile(make_job(2), [], now=NOW, options=FED, federation=view(alpha({})))
    assert waiting.create == []
    ready = conditions(waiting)["Ready"]
    assert (ready["status"], ready["reason"]) == ("False", "WaitingForSeed")
    assert "party alpha forms the initial set" in ready["message"]
    assert waiting.status["phase"] == "Pending"
    # ... while alpha, seeing beta with no members either, forms the initial set itself
    beta = RemoteParty(party="beta", members={}, replicas=1, admits_us=True)
    first = reconcile(make_job(2), [], now=NOW, options=Options(party="alpha"),
                      federation=view(beta, party="alpha"))  # fmt: skip
    assert len(first.create) == 2 and all("members" in config_of(p) for p in first.create)
    # a smaller party that wants no workers, or does not admit us, is not waited for
    for other in (alpha({}, replicas=0), alpha({}, admits_us=False)):
        plan = reconcile(make_job(2), [], now=NOW, options=FED, federation=view(other))
        assert len(plan.create) == 2


def test_a_set_that_is_starting_elsewhere_is_waited_for() -> None:
    # gamma is a larger name than ours, but its initial set exists already: join it later
    gamma = RemoteParty(party="gamma", members={}, replicas=2, admits_us=True, starting=2)
    plan = reconcile(make_job(2), [], now=NOW, options=FED, federation=view(gamma))
    assert plan.create == []
    assert "members of party gamma are starting" in conditions(plan)["Ready"]["message"]


def test_a_new_job_waits_for_an_exchange_with_each_peer_is_waited_for_then_not() -> None:
    settling = view(settling=("alpha",), unsynced=("alpha (NotSynced)",))
    plan = reconcile(make_job(2), [], now=NOW, options=FED, federation=settling)
    assert plan.create == []
    assert "waiting for an exchange with alpha" in conditions(plan)["Ready"]["message"]
    # the peer stays silent past the start-up grace: the party goes on alone
    alone = replace(settling, settling=())
    plan = reconcile(make_job(2), [], now=NOW, options=FED, federation=alone)
    assert len(plan.create) == 2
    synced = conditions(plan)["FederationSynced"]
    assert (synced["status"], synced["reason"]) == ("False", "PeersNotSynced")
    assert "alpha (NotSynced)" in synced["message"]


def test_the_remote_limit_decides_where_we_join_not_how_many_we_run() -> None:
    # alpha admits 1 of our workers, we want 3: we run 3, in a set of our own, and say why
    plan = reconcile(make_job(3), [], now=NOW, options=FED, federation=view(alpha(max_workers=1)))
    assert len(plan.create) == 3 and all("members" in config_of(p) for p in plan.create)
    message = conditions(plan)["FederationSynced"]["message"]
    assert "party alpha admits at most 1 of our workers" in message
    # alpha admits all 3: they join through alpha
    plan = reconcile(make_job(3), [], now=NOW, options=FED, federation=view(alpha(max_workers=3)))
    assert [config_of(p)["join"] for p in plan.create] == ["10.0.0.1:7070"] * 3
    # a limit below what already runs removes nothing of ours
    world = World(3, FED)
    world.step()
    world.run_all()
    plan = reconcile(world.job, list(world.pods.values()), now=NOW, options=FED,
                     federation=view(alpha(max_workers=2)))  # fmt: skip
    assert plan.delete == [] and plan.create == []
    assert plan.status["phase"] == "Running"


def test_without_federation_nothing_changes() -> None:
    plan = reconcile(make_job(2), [], now=NOW)
    assert "FederationSynced" not in conditions(plan)
    assert config_of(plan.create[0])["id"] == "digits-w0"
    assert "remoteMembers" not in plan.status


def peer(name: str = "alpha", ns: str = "ns", **policy) -> ChaosPeer:
    return ChaosPeer.model_validate(
        {
            "metadata": {"name": name, "namespace": ns, "generation": 2},
            "spec": {
                "party": name,
                "endpoint": "https://127.0.0.1:1",
                "keyFingerprint": "sha256:" + "0" * 64,
                "policy": policy,
            },
        }
    )


def test_outgoing_tells_each_peer_its_admission_and_our_jobs_in_its_namespace() -> None:
    jobs = [
        PublishedJob("ns", "a", "mnist", {"beta.a-w0": "h:1"}, 2),
        PublishedJob("ns", "b", "mnist", {"beta.b-w0": "h:4"}, 1),
        PublishedJob("other", "c", "cifar", {"beta.c-w0": "h:7"}, 1),
    ]
    message = outgoing("beta", peer(mayContributeWorkers=False, maxWorkers=4), jobs)
    assert message.party == "beta"
    (info,) = message.federations
    assert info.name == "mnist" and info.replicas == 3
    assert info.members == {"beta.a-w0": "h:1", "beta.b-w0": "h:4"}
    assert (info.admitted, info.max_workers) == (False, 4)
    assert SyncMessage.decode(message.encode()) == message


def test_job_view_uses_fresh_records_and_drops_trust_failures() -> None:
    said = SyncMessage(
        party="alpha",
        federations=[FederationInfo(name="mnist", members=A_MEMBERS, replicas=2, admitted=True)],
    )
    record = {("ns", "alpha"): PeerRecord("alpha", said, at=100.0)}
    fresh = job_view("beta", "mnist", [peer()], record, {}, now=105.0, ttl_s=10)
    assert fresh.remotes[0].members == A_MEMBERS and not fresh.unsynced
    assert job_view("beta", "cifar", [peer()], record, {}, now=105, ttl_s=10).remotes == ()
    stale = job_view("beta", "mnist", [peer()], record, {}, now=111.0, ttl_s=10)
    assert stale.remotes == () and stale.unsynced == ("alpha (NotSynced)",)
    distrusted = job_view("beta", "mnist", [peer()], record, {("ns", "alpha"): "Rejected"},
                          now=105.0, ttl_s=10)  # fmt: skip
    assert distrusted.remotes == () and distrusted.settling == ()
    # a new job waits for an exchange with each peer after it appeared, for at most ttl_s
    assert job_view("beta", "mnist", [peer()], record, {}, now=105, ttl_s=10).settling
    assert job_view("beta", "mnist", [peer()], record, {}, now=105, ttl_s=10, since=101).settling
    assert not job_view("beta", "mnist", [peer()], record, {}, now=105, ttl_s=10, since=99).settling
    assert not job_view("beta", "mnist", [peer()], {}, {}, now=115, ttl_s=10, since=104).settling


def test_peer_status_and_its_events() -> None:
    ok = ExchangeOutcome(True, "Synced", "exchanged with party alpha", "alpha")
    status, event = peer_status({}, ok, members=2, generation=2, now=NOW)
    assert status["reachable"] is True and status["members"] == 2
    assert status["observedGeneration"] == 2
    assert status["lastHandshakeTime"] == "2026-11-22T15:00:00Z"
    (federated,) = status["conditions"]
    assert (federated["type"], federated["status"], federated["reason"]) == (
        "Federated", "True", "Synced")  # fmt: skip
    assert event == ("Synced", "exchanged with party alpha", "Normal")
    later = NOW + timedelta(minutes=1)
    again, event = peer_status(status, ok, members=2, generation=2, now=later)
    assert event is None and again["conditions"] == status["conditions"]
    bad = ExchangeOutcome(False, "FingerprintMismatch", "the peer's key is sha256:...")
    failed, event = peer_status(again, bad, members=2, generation=2, now=later)
    assert failed["reachable"] is False and failed["members"] == 0
    assert failed["lastHandshakeTime"] == again["lastHandshakeTime"]
    assert failed["conditions"][0]["reason"] == "FingerprintMismatch"
    assert event is not None and event[0] == "FingerprintMismatch" and event[2] == "Warning"
    ChaosPeer.model_validate({**peer().to_k8s(), "status": failed})
    # the status is written again only when more than the handshake time changed, or that
    # by 30 s or more
    soon, _ = peer_status(status, ok, members=2, generation=2, now=NOW + timedelta(seconds=10))
    late, _ = peer_status(status, ok, members=2, generation=2, now=NOW + timedelta(seconds=30))
    more, _ = peer_status(status, ok, members=3, generation=2, now=NOW + timedelta(seconds=1))
    assert status_unchanged(status, soon)
    assert not status_unchanged(status, late)
    assert not status_unchanged(status, more)
    assert not status_unchanged(status, failed)


def test_identity_init_writes_a_secret_layout_and_prints_the_fingerprint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "id"
    assert main(["identity", "init", "--party", "alpha", "--out", str(out),
                 "--san", "chaos.alpha.example", "--san", "10.1.2.3"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    loaded = ident.load(out)
    assert f"keyFingerprint: {loaded.fingerprint}" in printed
    assert "PRIVATE KEY" not in printed
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {
        "ca.crt": 0o644, "ca.key": 0o600, "tls.crt": 0o644, "tls.key": 0o600}  # fmt: skip
    cert = ident.parse_certificate((out / "tls.crt").read_bytes())
    assert ident.party_of(cert) == "alpha"
    sans = cert.extensions.get_extension_for_class(ident.x509.SubjectAlternativeName).value
    assert [str(n.value) for n in sans] == ["chaos.alpha.example", "10.1.2.3"]
    ChaosPeer.model_validate(
        {"spec": {"party": "alpha", "endpoint": "https://x", "keyFingerprint": loaded.fingerprint}}
    )
    # bad input: one line, exit code 2, nothing overwritten
    assert main(["identity", "init", "--party", "alpha", "--out", str(out)]) == 2
    assert main(["identity", "init", "--party", "Alpha!", "--out", str(tmp_path / "x")]) == 2
    assert main(["identity", "show", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 3 and "Traceback" not in err
    assert ident.load(out).fingerprint == loaded.fingerprint


def test_operator_federation_flags_refuse_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ident.write(ident.create("alpha"), tmp_path / "id")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "tls.crt").write_bytes((tmp_path / "id" / "tls.crt").read_bytes())
    cases = [
        ["--identity", str(tmp_path / "id")],  # no listen address
        ["--federation-listen", "127.0.0.1:8443"],  # no identity
        ["--identity", str(tmp_path / "id"), "--federation-listen", "8443"],
        ["--identity", str(tmp_path / "id"), "--federation-listen", "h:99999"],
        ["--identity", str(tmp_path / "half"), "--federation-listen", "h:8443"],
    ]
    for extra in cases:
        assert main(["operator", "-n", "ns", *extra]) == 2, extra
    err = capsys.readouterr().err.splitlines()
    assert len(err) == len(cases) and all(line.startswith("chaos operator: error:") for line in err)
    assert "missing ca.crt, tls.key" in err[-1]
