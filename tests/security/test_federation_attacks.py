"""A hostile party against the federation between operators (issue #15, "Federation").

The attacker holds real credentials: its own party's CA and a ChaosPeer of ours that pins it.
Where TLS is the point the attack runs over real mutual TLS on loopback; where a rule is the
point it goes through the same path as a received message (`SyncMessage.decode` ->
`job_view` -> `reconcile`). Each test says in its docstring what the old code did, and
checks that the honest case still works. Nothing is timed: the bounded wait is driven by the
`now` the reconcile is given.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from chaos_operator.federation import identity as ident
from chaos_operator.federation import tls
from chaos_operator.federation.protocol import MAX_BODY_BYTES, MAX_MEMBERS, SYNC_PATH, SyncMessage
from chaos_operator.federation.rules import FederationView, PeerRecord, job_view
from chaos_operator.federation.service import FederationService
from chaos_operator.pods import Options
from chaos_operator.reconcile import reconcile
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from tests.unit.test_federation_tls import Party, make_identity, peer
from tests.unit.test_reconcile import NOW, World, config_of, make_job

pytestmark = pytest.mark.security

US = Options(party="beta")
"""We are party beta; the attacker is party alpha (a smaller name: it would seed first)."""
NO_KEY = "sha256:" + "0" * 64


def forge(
    ca_dir: Path, party: str, out: Path, *, days: tuple[int, int] = (-1, 30)
) -> ident.Identity:
    """An operator identity for `party` signed by the CA in `ca_dir` (whose key the attacker
    holds), valid from `days[0]` to `days[1]` days from now, for localhost and 127.0.0.1."""
    ca_cert = ident.parse_certificate((ca_dir / ident.CA_CERT).read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / ident.CA_KEY).read_bytes(), None)
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, party),
            x509.NameAttribute(NameOID.COMMON_NAME, party),
        ]
    )
    sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    key, cert = ident.issue(
        ca_key, ca_cert.subject, subject, sans,
        now + dt.timedelta(days=days[0]), now + dt.timedelta(days=days[1]),
    )  # fmt: skip
    out.mkdir(parents=True)
    ident.write_file(out / ident.CA_CERT, (ca_dir / ident.CA_CERT).read_bytes(), 0o644)
    ident.write_file(out / ident.TLS_CERT, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    ident.write_file(out / ident.TLS_KEY, ident.private_pem(key), 0o600)
    return ident.load(out)


def said_by_alpha(**federation: Any) -> SyncMessage:
    """What the attacker sends, as raw JSON through the receiver's own decoder."""
    info = {"name": "mnist", "members": {}, "replicas": 2, "admitted": True, **federation}
    return SyncMessage.decode(json.dumps({"version": 1, "party": "alpha",
                                          "federations": [info]}).encode())  # fmt: skip


def heard(message: SyncMessage) -> FederationView:
    """Our job's view after hearing `message` from the ChaosPeer that pins party alpha."""
    record = {("ns", "alpha"): PeerRecord("alpha", message, at=100.0)}
    return job_view("beta", "mnist", [peer("alpha", 1, fingerprint=NO_KEY)], record, {},
                    now=100.0, ttl_s=10.0, since=0.0)  # fmt: skip


@pytest.fixture
def ids(tmp_path: Path) -> dict[str, ident.Identity]:
    return {name: make_identity(tmp_path, name) for name in ("alpha", "beta")}


@pytest.fixture
def servers() -> Iterator[list[Party]]:
    started: list[Party] = []
    yield started
    for party in started:
        party.close()


def serve(servers: list[Party], identity: ident.Identity) -> Party:
    party = Party(identity)
    servers.append(party)
    return party


# ------------------------------------------------------------------ 1. the party's name


def test_a_party_cannot_speak_in_another_partys_name(
    ids: dict[str, ident.Identity], servers: list[Party], tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """Party beta (pinned by its CA bundle) has its CA issue a certificate for "gamma".

    Old: a message's party was its certificate's common name, so beta's message was stored as
    party gamma's (server side), and beta's server with that certificate was recorded as gamma
    (client side). Now the party is the one the pinning ChaosPeer names: the server refuses
    the client (403, a PartyMismatch log line), the client refuses the server before sending
    anything (PartyMismatch, a trust failure that posts a Warning Event), nothing is stored.
    """
    us = serve(servers, ids["alpha"])
    us.service.set_peers([peer("beta", 1, bundle=ids["beta"].ca_cert)])
    to_us = peer("alpha", us.port, fingerprint=ids["alpha"].fingerprint)
    # honest control: beta's own certificate and name get through and count as beta
    tls.exchange(ids["beta"], to_us, SYNC_PATH, SyncMessage(party="beta").encode())
    assert {k: r.party for k, r in us.records().items()} == {("ns", "beta"): "beta"}
    before = us.records()

    gamma = forge(tmp_path / "beta", "gamma", tmp_path / "forged")
    claim = SyncMessage(party="gamma").encode()
    logs = caplog.at_level(logging.WARNING, "chaos_operator.federation")
    with logs, pytest.raises(tls.PeerError) as refused:
        tls.exchange(gamma, to_us, SYNC_PATH, claim)
    assert refused.value.reason == "Rejected", refused.value
    assert us.records() == before, "a message in another party's name was stored"
    assert any("PartyMismatch" in r.getMessage() for r in caplog.records), caplog.text

    # the other direction: we call beta's endpoint, which shows the certificate for "gamma"
    impostor = serve(servers, gamma)
    impostor.service.set_peers([peer("alpha", us.port, bundle=ids["alpha"].ca_cert)])
    outcome = us.service.exchange(peer("beta", impostor.port, bundle=ids["beta"].ca_cert))
    assert (outcome.ok, outcome.reason) == (False, "PartyMismatch"), outcome
    assert "names party gamma" in outcome.message and "names party beta" in outcome.message
    assert not impostor.records(), "we sent our message to a server in another party's name"
    assert us.service.view("ns", "mnist").remotes == ()


# ------------------------------------------------------------ 2. our replicas are ours


def test_a_remote_max_workers_cannot_remove_our_workers() -> None:
    """Party alpha says it admits at most 0 of our workers.

    Old: the reconcile capped our replicas at the remote `maxWorkers` and deleted all three of
    our running pods (and created none for a new job). Now our `spec.replicas` alone decides
    our pods; the remote limit only keeps us from joining through alpha, and the job's
    `FederationSynced` message states it.
    """
    view = heard(said_by_alpha(members={"alpha.digits-w0": "10.0.0.1:7070"}, maxWorkers=0))
    world = World(3, US)
    world.step()
    world.run_all()
    plan = reconcile(world.job, list(world.pods.values()), now=NOW, options=US, federation=view)
    assert (plan.delete, plan.create) == ([], [])
    assert plan.status["replicas"] == 3 and plan.status["phase"] == "Running"
    synced = {c["type"]: c for c in plan.status["conditions"]}["FederationSynced"]
    assert "party alpha admits at most 0 of our workers" in synced["message"]
    # a new job still creates its three, in a set of its own, not through alpha
    fresh = reconcile(make_job(3), [], now=NOW, options=US, federation=view)
    assert len(fresh.create) == 3
    assert all("join" not in config_of(p) for p in fresh.create)


# ------------------------------------------------------------------- 3. where we join


def test_a_remote_cannot_point_our_newcomers_at_an_address_of_its_choice() -> None:
    """Party alpha announces a member in *our* name (and one in gamma's) at its own address.

    Old: every announced member could be a seed, whoever's name it carried, so our new
    workers were told to join `evil.example:22`. Now only members in the sender's own name
    count (a party speaks for its own workers only); the rest is ignored and reported, and our
    newcomers join only through alpha's own members.
    """
    lies = {"beta.digits-w0": "evil.example:22", "gamma.digits-w0": "evil.example:23"}
    view = heard(said_by_alpha(members=lies))
    assert view.remotes[0].members == {} and view.seed(2) is None
    assert view.ignored == ("2 members that party alpha announced in another party's name",)
    plan = reconcile(make_job(2), [], now=NOW, options=US, federation=view)
    assert all(not config_of(p).get("join", "").startswith("evil") for p in plan.create)
    # alpha's own member is a seed as before
    honest = heard(said_by_alpha(members={**lies, "alpha.digits-w0": "10.0.0.1:7070"}))
    plan = reconcile(make_job(2), [], now=NOW, options=US, federation=honest)
    assert [config_of(p)["join"] for p in plan.create] == ["10.0.0.1:7070"] * 2


# ------------------------------------------------------------------- 4. waiting forever


def test_a_remote_that_is_forever_starting_delays_us_only_boundedly() -> None:
    """Party alpha says, in every exchange, that 5 of its members are starting.

    Old: our new job waited (`Ready` False, `WaitingForSeed`) as long as alpha said so, that
    is forever. Now it waits at most `seed_wait_s` after `Ready` turned False, then forms its
    own initial set, with a Warning Event that says what it waited for.
    """
    view = heard(said_by_alpha(starting=5))
    first = reconcile(make_job(2), [], now=NOW, options=US, federation=view)
    ready = {c["type"]: c for c in first.status["conditions"]}["Ready"]
    assert first.create == [] and ready["reason"] == "WaitingForSeed"
    job = make_job(2, status=first.status)
    wait = dt.timedelta(seconds=US.seed_wait_s)
    almost = reconcile(job, [], now=NOW + wait - dt.timedelta(seconds=1), options=US,
                       federation=view)  # fmt: skip
    assert almost.create == []
    done = reconcile(job, [], now=NOW + wait, options=US, federation=view)
    assert len(done.create) == 2 and all("members" in config_of(p) for p in done.create)
    event = done.events["digits-w0"]
    assert event.type == "Warning" and "members of party alpha are starting" in event.message


# ----------------------------------------------------------------- 5. certificate dates


@pytest.mark.parametrize(
    ("days", "why"), [((-10, -1), "expired at"), ((1, 10), "is not valid before")]
)
def test_a_pinned_key_on_a_certificate_out_of_its_dates_is_refused(
    ids: dict[str, ident.Identity], servers: list[Party], tmp_path: Path,
    days: tuple[int, int], why: str,
) -> None:  # fmt: skip
    """Party beta's server shows a certificate out of its validity dates; we pin its key.

    Old: a key pin skipped every certificate check, dates included, and the exchange went
    through. Now the dates are checked right after the handshake, before anything is sent.
    """
    stale = forge(tmp_path / "beta", "beta", tmp_path / "stale", days=days)
    us = FederationService(ids["alpha"], api=None, listen=("127.0.0.1", 0))
    for identity, ok in ((ids["beta"], True), (stale, False)):  # honest control first
        server = serve(servers, identity)
        server.service.set_peers([peer("alpha", 1, bundle=ids["alpha"].ca_cert)])
        outcome = us.exchange(peer("beta", server.port, fingerprint=identity.fingerprint))
        if ok:
            assert outcome.ok, outcome
            continue
        assert (outcome.ok, outcome.reason) == (False, "CertificateInvalid"), outcome
        assert why in outcome.message
        assert not server.records(), "we sent our message before checking the dates"


# --------------------------------------------------------------- every number bounded


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("replicas", 2.0), ("replicas", "2"), ("replicas", True), ("replicas", 100_001),
        ("starting", -1), ("maxWorkers", 10**12), ("admitted", 1),
        ("members", {"alpha.w0": "h:0"}), ("members", {"alpha.w0": "h:99999"}),
        ("members", {"alpha.w0": "http://h/"}), ("members", {"alpha w0": "h:1"}),
        ("members", {f"alpha.w{i}": "h:1" for i in range(MAX_MEMBERS + 1)}),
        ("extra", 1),
    ],
)  # fmt: skip
def test_every_field_of_a_sync_message_is_bounded(field: str, value: Any) -> None:
    """Old: counts took floats, strings and booleans, `maxWorkers` had no upper bound and a
    port was any five digits. Now each is refused before anything reads it."""
    info = {"name": "mnist", "members": {}, "replicas": 2, "admitted": True, field: value}
    body = json.dumps({"version": 1, "party": "alpha", "federations": [info]}).encode()
    with pytest.raises(ValueError):
        SyncMessage.decode(body)


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e400"])
def test_non_finite_numbers_are_refused(literal: bytes) -> None:
    body = b'{"version":1,"party":"alpha","federations":[{"name":"m","replicas":%s,' % literal
    with pytest.raises(ValueError):
        SyncMessage.decode(body + b'"admitted":true}]}')


def test_a_body_over_the_limit_is_refused_unread() -> None:
    with pytest.raises(ValueError, match="larger than"):
        SyncMessage.decode(b" " * (MAX_BODY_BYTES + 1))
