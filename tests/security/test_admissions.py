"""A joiner is admitted only with an admission its party's worker CA signed for this job
(issue #15): a certificate of a CA the job trusts is not enough.

Issuing and checking (`chaos_worker.config.Admission`, `membership/joiners.py`) with real
CAs, a federation's cross-certified bundle included; the admission's bounds at decode; a
worker whose own admission is bad stops at once; a real `Member` over real TLS refuses a
relayed unadmitted join without blaming the relay; and a live 3-worker `chaos run`
(float64) that seven authenticated joiners without a valid admission (the last with a
valid one of its own member id, but for another key of that name) ask to join trains as
one nobody asked, each refusal counted at the member asked. The admitted join is the one
of `tests/cluster/test_run.py -k join`, whose newcomers carry their run's admissions.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch
from chaos_cli.local.launcher import JobOptions, LocalRun
from chaos_operator.federation.identity import CA_CERT, CA_KEY, write_file
from chaos_operator.federation.workerca import WorkerAuthority, WorkerCA
from chaos_worker.config import Admission, TlsFiles, WorkerConfig, key_sha256, read_admission
from chaos_worker.examples import EXAMPLES
from chaos_worker.member import Member
from chaos_worker.membership.joiners import OwnAdmission, unadmitted
from chaos_worker.membership.view import full_mesh, initial_view
from chaos_worker.net.signing import Signer, Verifier
from chaos_worker.net.tls import PeerIdentity, TlsError
from chaos_worker.net.wire import Proposal, WireError, decode_header
from chaos_worker.training.trainspec import load_trainspec
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.cluster.test_run import assert_same_losses
from tests.security.test_verified_state import rejected, secured
from tests.transportkit import Node, close_all, start, until

pytestmark = pytest.mark.security

JOB = "job-a"
HOUR = 3600


def admission_of(files: TlsFiles) -> Admission:
    assert files.admission is not None
    return read_admission(files.admission)


def cas_of(files: TlsFiles) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(Path(files.ca).read_bytes())


def key_of(files: TlsFiles) -> str:
    """`key_sha256` of the certificate in `files`: the key its admission must name."""
    return key_sha256(x509.load_pem_x509_certificate(Path(files.cert).read_bytes()))


ANY_KEY = key_sha256(ec.generate_private_key(ec.SECP256R1()).public_key())
"""A key for the pure checks whose other fields are what they test."""


# ------------------------------------------------------------------------ issue and check


def test_an_admission_names_job_party_member_and_window_and_every_field_is_checked(
    tmp_path: Path,
) -> None:
    ca = WorkerCA(tmp_path / "run-ca", "local", job=JOB)
    files = ca.issue("w5")
    admission, cas, now = admission_of(files), cas_of(files), time.time()
    cert = x509.load_pem_x509_certificate(Path(files.cert).read_bytes())
    # the certificate's window, the run's job, the CA's party
    assert (admission.job, admission.party, admission.member) == (JOB, "local", "w5")
    assert admission.not_before == int(cert.not_valid_before_utc.timestamp())
    assert admission.not_after == int(cert.not_valid_after_utc.timestamp())
    assert admission.key_sha256 == key_sha256(cert)  # the key issued with it
    assert admission.signed_by(ca.authority.certificate.public_key())
    w5, key = PeerIdentity("local", "w5"), key_sha256(cert)
    assert unadmitted(admission, w5, key, JOB, "local", cas, now) is None

    def why(candidate: Admission | None, joiner: PeerIdentity = w5, job: str = JOB) -> str:
        reason = unadmitted(candidate, joiner, key, job, "local", cas, now)
        assert reason is not None
        return reason

    stranger = WorkerAuthority.create("local", days=30)
    beta = WorkerAuthority.create("beta", days=30)
    start_, end = int(now) - HOUR, int(now) + HOUR
    assert why(None) == "no admission"
    assert "job 'job-a', not 'job-b'" in why(admission, job="job-b")
    assert "local/w5" in why(admission, PeerIdentity("local", "w6"))  # another member's
    assert "local/w5" in why(admission, PeerIdentity("beta", "w5"))  # another party's
    expired = ca.authority.admit(JOB, "w5", *_dates(start_ - 2 * HOUR, start_), key=key)
    assert "valid from" in why(expired)
    early = ca.authority.admit(JOB, "w5", *_dates(end, end + HOUR), key=key)
    assert "valid from" in why(early)
    forged = stranger.admit(JOB, "w5", *_dates(start_, end), key=key)  # same party name
    assert why(forged) == "an admission not signed by the CA of party local"
    # a field changed after signing, or a signature moved to another admission
    moved = admission.model_copy(update={"job": "job-b"})
    assert "not signed" in why(moved, job="job-b")
    w6 = ca.authority.admit(JOB, "w6", *_dates(start_, end), key=key)
    assert "not signed" in why(w6.model_copy(update={"member": "w5"}))
    assert "not signed" in why(w6.model_copy(update={"sig": admission.sig}), PeerIdentity(
        "local", "w6"))  # fmt: skip
    # a party this bundle trusts no CA for
    beta_w1 = beta.admit(JOB, "beta.w1", *_dates(start_, end), key=key)
    assert why(beta_w1, PeerIdentity("beta", "beta.w1")) == "no CA trusted for party beta"
    # past its end, the admission of a member whose certificate is still valid is none
    assert "valid from" in (
        unadmitted(admission, w5, key, JOB, "local", cas, admission.not_after + 1) or ""
    )


def _dates(start: int, end: int) -> tuple[dt.datetime, dt.datetime]:
    return dt.datetime.fromtimestamp(start, dt.UTC), dt.datetime.fromtimestamp(end, dt.UTC)


def test_in_a_federation_a_party_admits_its_own_workers_only() -> None:
    """alpha's pods trust beta's CA as alpha's cross certificate binds it to beta: beta's
    admissions of beta's members pass, beta admitting one of alpha's does not, nor alpha
    one of beta's; alpha's own CA (federating: unbound) admits alpha's members."""
    alpha = WorkerAuthority.create("alpha", days=30, path_length=1)
    beta = WorkerAuthority.create("beta", days=30, path_length=1)
    cas = x509.load_pem_x509_certificates(alpha.bundle({"beta": beta.certificate}))
    now, key = time.time(), ANY_KEY
    window = _dates(int(now) - HOUR, int(now) + HOUR)
    fed = "fed-1"
    b1, a0 = PeerIdentity("beta", "beta.w1"), PeerIdentity("alpha", "alpha.w0")

    def why(admission: Admission, joiner: PeerIdentity) -> str | None:
        return unadmitted(admission, joiner, key, fed, "alpha", cas, now)

    assert why(beta.admit(fed, "beta.w1", *window, key=key), b1) is None
    assert why(alpha.admit(fed, "alpha.w0", *window, key=key), a0) is None
    # beta signs an admission in alpha's name, or alpha one in beta's
    as_alpha = beta.admit(fed, "alpha.w0", *window, key=key).model_copy(update={"party": "alpha"})
    assert "not signed by the CA of party alpha" in (why(as_alpha, a0) or "")
    as_beta = alpha.admit(fed, "beta.w1", *window, key=key).model_copy(update={"party": "beta"})
    assert "not signed by the CA of party beta" in (why(as_beta, b1) or "")
    # beta's admission to another federated job
    assert "job" in (why(beta.admit("fed-2", "beta.w1", *window, key=key), b1) or "")


# ---------------------------------------------------------------------------------- bounds


def _join_header(admission: dict | None) -> bytes:
    header = {
        "type": "proposal",
        "id": "p",
        "origin": "w5",
        "kind": "join",
        "subject": "w5",
        "address": "127.0.0.1:1",
        "detected_at": 1.0,
        "epoch": -1,
        "admission": admission,
    }
    return json.dumps(header).encode()


def test_the_admission_field_is_bounded_and_strict_at_decode(tmp_path: Path) -> None:
    good = {
        "job": JOB,
        "party": "local",
        "member": "w5",
        "key_sha256": "0" * 64,
        "not_before": 1,
        "not_after": 2,
        "sig": "AAAA",
    }
    assert decode_header(_join_header(good)).admission == Admission(**good)  # type: ignore[union-attr]
    bad = [
        {**good, "sig": "A" * 129},  # longer than any P-256 signature
        {**good, "job": "j" * 254},
        {**good, "member": "_seed"},  # names a link, not a member
        {**good, "key_sha256": "0" * 63},
        {**good, "key_sha256": "A" * 64},  # hex, lower case only
        {**good, "party": "Not_A_Label"},
        {**good, "not_after": 2**53},
        {**good, "extra": 1},
        {k: v for k, v in good.items() if k != "job"},
        {k: v for k, v in good.items() if k != "key_sha256"},  # one of before the binding
        "an admission",
    ]
    for admission in bad:
        with pytest.raises(WireError):
            decode_header(_join_header(admission))  # type: ignore[arg-type]
    # the file a worker reads: bounded, and one clear reason
    big = tmp_path / "big.json"
    big.write_bytes(b" " * 5000)
    with pytest.raises(ValueError, match="over 4096 bytes"):
        read_admission(str(big))
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({**good, "not_after": "soon"}))
    with pytest.raises(ValueError, match=r"is no admission \(bad not_after\)"):
        read_admission(str(broken))
    with pytest.raises(ValueError, match="cannot read the admission"):
        read_admission(str(tmp_path / "missing.json"))


FIELDS = st.one_of(
    st.text(max_size=8),
    st.integers(-(2**60), 2**60),
    st.floats(allow_nan=True, allow_infinity=True),
    st.none(),
    st.sampled_from(["", "A", "====", "w5", "local", JOB, "_seed", "A" * 200]),
)


FUZZ_CA = WorkerAuthority.create("local", days=1)
FUZZ_WINDOW = _dates(int(time.time()) - HOUR, int(time.time()) + HOUR)
FUZZ_BASE = FUZZ_CA.admit(JOB, "w5", *FUZZ_WINDOW, key=ANY_KEY)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(Admission.model_fields)), FIELDS), st.binary())
def test_any_admission_a_peer_sends_decodes_or_is_refused_and_never_breaks_the_check(
    fields: dict, junk: bytes
) -> None:
    """Whatever a joiner puts in its admission (a genuine one with fields replaced, or junk),
    decoding gives a valid one or `WireError`, and checking a valid one gives a reason or
    None (only the genuine one), never an exception."""
    w5, cas = PeerIdentity("local", "w5"), [FUZZ_CA.certificate]
    for header in (_join_header({**FUZZ_BASE.model_dump(), **fields}), junk):
        try:
            proposal = decode_header(header)
        except WireError:
            continue
        assert isinstance(proposal, Proposal)
        why = unadmitted(proposal.admission, w5, ANY_KEY, JOB, "local", cas, time.time())
        assert (why is None) == (proposal.admission == FUZZ_BASE), why


# ---------------------------------------------------------------------- own admission


def test_a_worker_whose_own_admission_is_bad_stops_with_one_clear_line(tmp_path: Path) -> None:
    ca = WorkerCA(tmp_path / "run-ca", "local", job=JOB)
    files = ca.issue("w0")
    verifier = Verifier(files.ca)
    assert OwnAdmission(files, verifier).job == JOB
    stranger = WorkerAuthority.create("local", days=1)
    w1 = ca.issue("w1")
    window = _dates(int(time.time()) - HOUR, int(time.time()) + HOUR)
    forged = stranger.admit(JOB, "w0", *window, key=key_of(files))
    write_file(tmp_path / "forged.json", forged.model_dump_json().encode(), 0o644)
    elsewhere = ca.authority.issue("w0", job=JOB).admission  # another certificate's
    assert elsewhere is not None
    write_file(tmp_path / "elsewhere.json", elsewhere, 0o644)
    for admission, needle in [
        (w1.admission, r"does not admit local/w0 of \S+w0\.crt: an admission of local/w1"),
        (str(tmp_path / "forged.json"), "not signed by the CA of party local"),
        (str(tmp_path / "elsewhere.json"), "an admission for another key than its certificate's"),
        (str(tmp_path / "missing.json"), "cannot read the admission"),
    ]:
        bad = files.model_copy(update={"admission": admission})
        with pytest.raises(TlsError, match=needle):
            OwnAdmission(bad, verifier)
    # the process: exit 2 and one line naming the file and why, no key material
    config = WorkerConfig(
        id="w0",
        entry=EXAMPLES["mlp"],
        members={"w0": "127.0.0.1:0"},
        tls=files.model_copy(update={"admission": w1.admission}),
    )
    path = tmp_path / "w0.json"
    path.write_text(config.model_dump_json())
    done = subprocess.run(
        [sys.executable, "-m", "chaos_cli.main", "worker", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert lines[-1].startswith("chaos worker w0: error: ") and "w1.admission" in lines[-1]
    assert "PRIVATE" not in done.stderr


def test_a_renewed_own_admission_is_taken_up_unless_it_names_another_job(
    tmp_path: Path,
) -> None:
    ca = WorkerCA(tmp_path / "run-ca", "local", job=JOB)
    files = ca.issue("w0")
    own = OwnAdmission(files, Verifier(files.ca))
    first = own.current()
    window = _dates(int(time.time()), int(time.time()) + HOUR)
    renewed = ca.authority.admit(JOB, "w0", *window, key=key_of(files))
    assert files.admission is not None
    write_file(Path(files.admission), renewed.model_dump_json().encode(), 0o644)
    assert own.current() == renewed != first
    moved = ca.authority.admit("job-b", "w0", *window, key=key_of(files))
    write_file(Path(files.admission), moved.model_dump_json().encode(), 0o644)
    assert own.current() == renewed and own.job == JOB


# --------------------------------------------------------------- a real member, relayed


def join(
    files: TlsFiles, name: str, admission: Admission | None, address: str = "127.0.0.1:1"
) -> Proposal:
    """`name`'s sealed join proposal carrying `admission`."""
    proposal = Proposal(
        id=uuid.uuid4().hex,
        origin=name,
        kind="join",
        subject=name,
        address=address,
        detected_at=0.0,
        epoch=-1,
        mode="copy",
        admission=admission,
    )
    sealed = Signer(files, name).seal(proposal)
    assert isinstance(sealed, Proposal)
    return sealed


def proposals(node: Node, subject: str) -> int:
    return sum(isinstance(m, Proposal) and m.subject == subject for _, m, _ in node.got)


def test_a_member_refuses_a_relayed_unadmitted_join_and_does_not_blame_the_relay(
    tmp_path: Path,
) -> None:
    ca = WorkerCA(tmp_path / "run-ca", "local", job=JOB)
    other_job = WorkerCA(tmp_path / "other-ca", "local", job="job-b")
    config = WorkerConfig(
        id="w5",
        entry=EXAMPLES["mlp"],
        replicator="inline",
        metrics_port=0,
        members={"w5": "127.0.0.1:0", "w0": "127.0.0.1:1"},
        tls=ca.issue("w5"),
    )
    spec = load_trainspec(config.entry, seed=0, dtype=torch.float32, device=torch.device("cpu"))
    member = Member(config, spec, torch.device("cpu"))
    metrics = member.telemetry.metrics
    assert metrics is not None
    w8, w9 = ca.issue("w8"), ca.issue("w9")
    wrong_job = admission_of(other_job.issue("w9")).model_copy(update={"job": JOB})
    # w9's own admission to this job, but for another certificate of w9 (another key)
    other_key = ca.authority.issue("w9", job=JOB).admission
    assert other_key is not None

    async def scenario() -> None:
        address = f"127.0.0.1:{await member.transport.listen('127.0.0.1', 0)}"
        w0 = await start("w0", factory=secured(ca.issue("w0"), "w0"))
        w1 = await start("w1", factory=secured(ca.issue("w1"), "w1"))
        members = {"w0": w0.address, "w1": w1.address, "w5": address}
        member.membership.begin(initial_view(members, full_mesh(members)))  # w0 is root
        try:
            for node in (w0, w1):  # links both ways, as members hold them
                node.transport.connect("w5", address)
                member.transport.connect(node.name, node.address)
            # w1 relays w9's joins: none, to another job, signed by another job's CA, w8's
            # admission (another member), and one of w9 for another key; each is refused
            # (checked against the seal's certificate, not w1's), counted, not forwarded
            attempts = [None, admission_of(other_job.issue("w9")), wrong_job, admission_of(w8),
                        Admission.model_validate_json(other_key)]  # fmt: skip
            for admission in attempts:
                assert w1.transport.send("w5", join(w9, "w9", admission))
            await until(lambda: rejected(metrics, "unadmitted") == 5, "five refusals")
            # then w8's own admitted join over the same relay: taken in and flooded
            assert w1.transport.send("w5", join(w8, "w8", admission_of(w8)))
            await until(lambda: proposals(w0, "w8") == 1, "w8's join flooded")
            assert proposals(w0, "w9") == proposals(w1, "w9") == 0
            assert rejected(metrics, "forged") == 0
            assert member.membership.suspects == set()  # nobody blamed
        finally:
            await close_all(w0, w1)
            await member.transport.close()

    asyncio.run(scenario())


# ------------------------------------------------------------------------ a live run

STOP_AT = 40
"""Steps both runs make at least (the attacked one trains on while its attackers ask)."""


def _scrape(port: int) -> dict[str, float]:
    """`chaos_rejected_messages_total` of one worker, by reason."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    found = re.findall(r'^chaos_rejected_messages_total\{reason="(\w+)"\} (\S+)$', text, re.M)
    return {reason: float(value) for reason, value in found}


async def _attack(run: LocalRun, tmp: Path, seen: dict) -> None:
    """Seven authenticated joiners (certificates of the run's CA) ask w0 to join, each twice:
    with no admission, one to another job, one of another member, an expired one, one a
    stranger CA of the run's party name signed, one another party's CA signed in the run's
    party's name, and the run's own admission of the joiner's member id to this run but for
    another certificate of that name (an older pod's, say: another key); `seen` gets w0's,
    w1's and w2's refusal counts after."""
    tls = run.run_dir / "tls"
    ca = WorkerAuthority.from_pem((tls / CA_CERT).read_bytes(), (tls / CA_KEY).read_bytes())
    stranger = WorkerAuthority.create("local", days=1)
    beta = load_pem_private_key(WorkerAuthority.create("beta", days=1).key_pem, None)
    assert isinstance(beta, ec.EllipticCurvePrivateKey)
    job, now = run.run_dir.name, int(time.time())
    window = _dates(now - HOUR, now + HOUR)
    certs = {f"w{i}": ca.issue(f"w{i}", days=1) for i in range(7, 14)}
    key = {name: key_sha256(x509.load_pem_x509_certificate(c.cert)) for name, c in certs.items()}
    elsewhere = ca.issue("w13", days=1, job=job).admission  # another certificate's
    assert elsewhere is not None
    attempts = {
        "w7": None,
        "w8": ca.admit("another-run", "w8", *window, key=key["w8"]),
        "w9": ca.admit(job, "w3", *window, key=key["w9"]),
        "w10": ca.admit(job, "w10", *_dates(now - 2 * HOUR, now - HOUR), key=key["w10"]),
        "w11": stranger.admit(job, "w11", *window, key=key["w11"]),
        "w12": ca.admit(job, "w12", *window, key=key["w12"]).sign(beta),  # beta signs it
        "w13": Admission.model_validate_json(elsewhere),
    }
    nodes = []
    try:
        for name, admission in attempts.items():
            issued = certs[name]
            write_file(tmp / f"{name}.crt", issued.cert, 0o644)
            write_file(tmp / f"{name}.key", issued.key, 0o600)
            files = TlsFiles(cert=str(tmp / f"{name}.crt"), key=str(tmp / f"{name}.key"),
                             ca=str(tls / CA_CERT))  # fmt: skip
            node = await start(name, factory=secured(files, name))
            nodes.append(node)
            node.transport.connect("w0", run.procs["w0"].address)
            for _ in range(2):
                assert node.transport.send("w0", join(files, name, admission, node.address))
        ports = run.metrics_ports
        deadline = time.monotonic() + 60
        while _scrape(ports["w0"]).get("unadmitted", 0) < 14 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # anything flooded on would have reached w1 and w2 by now
        seen.update({w: _scrape(ports[w]) for w in ("w0", "w1", "w2")})
    finally:
        await close_all(*nodes)


def _live_run(tmp_path: Path, *, attack: bool) -> tuple[dict, dict, str]:
    """A 3-worker float64 run stopped once it made `STOP_AT` steps (and, `attack`, once its
    attackers were refused); its report, the refusal counts and w0's stderr."""
    tmp_path.mkdir()
    options = JobOptions(
        entry=EXAMPLES["digits"], workers=3, steps=100_000, dtype="float64", metrics=True
    )
    seen: dict = {}
    tasks: list[asyncio.Task] = []
    logs: list[str] = []

    def on_update(run: LocalRun) -> None:
        if attack and not tasks and run.max_step >= 5:
            tasks.append(asyncio.get_running_loop().create_task(_attack(run, tmp_path, seen)))
        attacked = not attack or (tasks and tasks[0].done())
        if attacked and run.max_step >= STOP_AT:
            logs.append((run.run_dir / "w0.stderr").read_text(errors="replace"))
            run.stop()

    report = asyncio.run(LocalRun(options, on_update=on_update).run()).model_dump()
    if tasks:
        tasks[0].result()  # its failure, if any
    return report, seen, logs[0] if logs else ""


def test_joiners_without_a_valid_admission_are_refused_and_the_run_trains_as_without_them(
    tmp_path: Path,
) -> None:
    attacked, seen, log = _live_run(tmp_path / "attacked", attack=True)
    clean, _, _ = _live_run(tmp_path / "clean", attack=False)
    # every attempt refused and counted at w0, none forwarded, nothing else refused
    assert seen["w0"].get("unadmitted") == 14
    assert seen["w0"].get("forged", 0) == 0
    assert all(seen[w].get("unadmitted", 0) == 0 for w in ("w1", "w2"))
    for name, why in [
        ("w7", "no admission"),
        ("w8", "job 'another-run'"),
        ("w9", "an admission of local/w3"),
        ("w10", "valid from"),
        ("w11", "not signed by the CA of party local"),
        ("w12", "not signed by the CA of party local"),
        ("w13", "an admission for another key than its certificate's"),
    ]:  # logged once per joiner, though each asked twice
        lines = [line for line in log.splitlines() if f"from '{name}' (unadmitted)" in line]
        assert len(lines) == 1 and why in lines[0], (name, lines)
    # the job trained on, with nobody added or blamed, as a run nobody asked to join
    assert attacked["events"] == [] and attacked["members_curve"][-1][1] == 3
    both = min(attacked["steps"], clean["steps"])
    assert both >= STOP_AT
    assert_same_losses(attacked["loss_curve"][:both], clean["loss_curve"][:both])
