"""Pure federation logic: what to tell a peer, what a job sees of the other parties, and a
`ChaosPeer`'s status. No I/O and no clock (callers pass `now`).

What a remote party sends is trusted only for what that party may decide, and a party can add
or remove only its own workers:

* whose message it is: the party its `ChaosPeer` names (`spec.party`); a record heard under
  another name is ignored;
* `members`: only ids in the sender's own name (`<party>.<pod>`) count, so only the sender's
  own workers can become our seeds; the rest is ignored and reported;
* `admitted`, `maxWorkers`: the sender's decision about our workers joining at *its* side.
  They decide whether we join through it, never how many workers we run: our own
  `spec.replicas` alone decides our pods;
* `replicas`, `starting`: the sender's own plans; they can make our new job wait for its
  initial set, and the reconcile bounds that wait;
* the terms of the sender's job (`JobTerms`: `steps`, `entry`, `globalBatch`, `seed`,
  `bucketBytes`). Every party must give the same: the job ends at the same reduced step
  everywhere, every member computes the same model on the same sample order, and workers
  refuse buckets cut another way. A party whose terms differ from ours is left out of the
  job's view (`FederationView.agreeing`): we neither join through it nor wait for it, and
  `FederationSynced` is False with a reason naming the first difference (`StepsMismatch`,
  `EntryMismatch`, `GlobalBatchMismatch`, `SeedMismatch`, `BucketMismatch`). A term not
  said (an older operator) is taken as agreed; the bucket is said only when it is not the
  workers' default, so operators that predate it still parse the message, and its silence
  means that default.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime
from typing import Any

from chaos_worker.config import BUCKET_BYTES

from chaos_operator.api import ChaosJob, ChaosPeer
from chaos_operator.api.conditions import set_condition
from chaos_operator.federation.protocol import FederationInfo, SyncMessage
from chaos_operator.pods import job_bucket_bytes

#: Reasons of a `Federated` condition that is False because trust failed (not the network).
TRUST_FAILURES = frozenset(
    {"FingerprintMismatch", "CertificateInvalid", "Rejected", "PartyMismatch", "HandshakeFailed"}
)


@dataclass(frozen=True)
class JobTerms:
    """What every party of a federation must give the same: its length, what it trains and
    how its workers reduce. None: not said (an older operator; a bucket said only when it
    is not the workers' default)."""

    steps: int | None = None
    entry: str | None = None
    global_batch: int | None = None
    seed: int | None = None
    bucket_bytes: int | None = None

    def said(self) -> dict[str, Any]:
        """These terms as `FederationInfo` fields: the bucket only when it is not the
        workers' default, so operators that predate the field still parse the message."""
        said = asdict(self)
        if said["bucket_bytes"] == BUCKET_BYTES:
            said["bucket_bytes"] = None
        return said

    @classmethod
    def heard(cls, info: FederationInfo) -> JobTerms:
        """The terms another party said in `info`."""
        return cls(**{f.name: getattr(info, f.name) for f in fields(cls)})

    def differences(self, ours: JobTerms, party: str) -> list[tuple[str, str]]:
        """(condition reason, message) for each of these terms, said by `party`, that is not
        `ours` (all said); the most telling first."""
        theirs = replace(self, bucket_bytes=self.bucket_bytes or BUCKET_BYTES)
        found = []
        for name, reason, what in _TERMS:
            said, mine = getattr(theirs, name), getattr(ours, name)
            if said is not None and said != mine:
                found.append((reason, f"party {party} {what.format(said)}, this job {mine}"))
        return found


def job_terms(job: ChaosJob, steps: int | None) -> JobTerms:
    """The terms of our `job`, which trains `steps` steps (`job_steps`)."""
    spec = job.spec
    return JobTerms(steps, spec.entry, spec.global_batch, spec.seed, job_bucket_bytes(job))


_TERMS = (
    ("steps", "StepsMismatch", "trains {} steps"),
    ("entry", "EntryMismatch", "trains {}"),
    ("global_batch", "GlobalBatchMismatch", "has a global batch of {}"),
    ("seed", "SeedMismatch", "has seed {}"),
    ("bucket_bytes", "BucketMismatch", "reduces buckets of {} bytes"),
)
"""(field, reason, wording) of every term, in the order a condition names them."""


@dataclass(frozen=True)
class PublishedJob:
    """What this party publishes about one of its ChaosJobs."""

    namespace: str
    name: str
    federation: str
    members: Mapping[str, str]
    """Running members: id -> trainer address."""
    replicas: int
    starting: int = 0
    """Members created (or being created) that do not run yet."""
    terms: JobTerms = JobTerms()
    """What the other parties' jobs must agree with (`job_terms`)."""


@dataclass(frozen=True)
class PeerRecord:
    """The latest message heard from a peer (by either side's request) and when."""

    party: str
    message: SyncMessage
    at: float
    """Monotonic seconds."""


@dataclass(frozen=True)
class RemoteParty:
    """Another party's part of one federation, as far as this party knows it."""

    party: str
    members: Mapping[str, str]
    replicas: int
    admits_us: bool
    max_workers: int | None = None
    we_admit: bool = True
    starting: int = 0
    terms: JobTerms = JobTerms()
    """What that party said of its job's terms."""

    def admits(self, workers: int) -> bool:
        """Whether the party admits `workers` workers of ours (its decision, for its side)."""
        return self.admits_us and (self.max_workers is None or workers <= self.max_workers)


def own_members(party: str, members: Mapping[str, str]) -> dict[str, str]:
    """The members a party announced in its own name (`<party>.<...>`): what it may speak for."""
    return {m: a for m, a in members.items() if m.startswith(party + ".")}


@dataclass(frozen=True)
class FederationView:
    """What a job of party `party` knows about the other parties of its federation.

    `remotes` holds the parties heard from recently that run a job of the same federation;
    `unsynced` describes the peers not heard from (for the `FederationSynced` condition).
    """

    party: str
    remotes: tuple[RemoteParty, ...] = ()
    unsynced: tuple[str, ...] = ()
    peers: int = field(default=0)
    """ChaosPeers that apply to the job (its namespace's)."""
    settling: tuple[str, ...] = ()
    """Peers not exchanged with since the job appeared (a bounded wait)."""
    ignored: tuple[str, ...] = ()
    """What remote parties sent that they may not decide (for the job's status)."""
    disagreeing: tuple[tuple[str, str], ...] = ()
    """(reason, message) of each term by which a party left out differs from ours
    (`agreeing`)."""

    def agreeing(self, ours: JobTerms) -> FederationView:
        """This view without the parties whose job's terms differ from `ours`."""
        found = {r.party: r.terms.differences(ours, r.party) for r in self.remotes}
        found = {party: diffs for party, diffs in sorted(found.items()) if diffs}
        if not found:
            return self
        return replace(
            self,
            remotes=tuple(r for r in self.remotes if r.party not in found),
            disagreeing=tuple(diff for diffs in found.values() for diff in diffs),
        )

    def seed(self, workers: int) -> tuple[RemoteParty, str, str] | None:
        """(party, member id, address) for `workers` new workers of ours to join through: the
        smallest party that admits that many and runs members, its smallest member id."""
        for remote in sorted(self.remotes, key=lambda r: r.party):
            if remote.admits(workers) and remote.members:
                member = min(remote.members)
                return remote, member, remote.members[member]
        return None

    def waiting_for(self, workers: int) -> str | None:
        """Why `workers` new workers of ours should not form an initial set now although no
        member runs anywhere, or None. The reconcile bounds how long it heeds this.

        We wait while a party that admits them has members starting (their set will run
        soon). Otherwise the initial set is formed by the smallest party name among the
        parties that admit each other's workers and want workers; we wait if that is not us.
        A new job also waits for one exchange with each peer after it appeared, so that two
        parties creating their jobs together have heard of each other before either decides.
        """
        admitting = [r for r in self.remotes if r.admits(workers)]
        forming = sorted(r.party for r in admitting if r.starting)
        if forming:
            return f"members of party {forming[0]} are starting"
        names = [
            r.party for r in admitting if r.replicas > 0 and not r.members and r.party < self.party
        ]
        if names:
            return f"party {min(names)} forms the initial set"
        if self.settling:
            return "waiting for an exchange with " + ", ".join(self.settling)
        return None

    def remote_members(self) -> int:
        """Members of other parties training with ours (either side admits the other)."""
        return sum(len(r.members) for r in self.remotes if r.admits_us or r.we_admit)


def outgoing(party: str, peer: ChaosPeer, jobs: Iterable[PublishedJob]) -> SyncMessage:
    """Our message for `peer`: our jobs in the peer's namespace, and its admission there."""
    policy = peer.spec.policy
    merged: dict[str, tuple[dict[str, str], int, int]] = {}
    terms: dict[str, JobTerms] = {}
    for job in sorted(jobs, key=lambda j: (j.namespace, j.name)):
        if job.namespace != peer.metadata.namespace:
            continue
        members, replicas, starting = merged.setdefault(job.federation, ({}, 0, 0))
        members.update(job.members)
        merged[job.federation] = (members, replicas + job.replicas, starting + job.starting)
        terms.setdefault(job.federation, job.terms)
    return SyncMessage(
        party=party,
        federations=[
            FederationInfo(
                name=name,
                members=members,
                replicas=replicas,
                starting=starting,
                admitted=policy.may_contribute_workers,
                max_workers=policy.max_workers,
                **terms[name].said(),
            )
            for name, (members, replicas, starting) in sorted(merged.items())
        ],
    )


def peer_key(peer: ChaosPeer) -> tuple[str, str]:
    return peer.metadata.namespace or "default", peer.metadata.name or ""


def job_view(
    party: str,
    federation: str,
    peers: Sequence[ChaosPeer],
    records: Mapping[tuple[str, str], PeerRecord],
    failures: Mapping[tuple[str, str], str],
    *,
    now: float,
    ttl_s: float,
    since: float | None = None,
) -> FederationView:
    """The federation view of a job from the ChaosPeers of its namespace and what they said.

    A record counts while it is younger than `ttl_s` and was heard from the party its
    ChaosPeer names; `failures` holds the reason of the last failed exchange of a peer, if its
    last exchange failed. `since` is when the job appeared (None: now): for `ttl_s` after it,
    peers not exchanged with since then are `settling`. One party counts once (its first
    ChaosPeer by namespace and name).
    """
    since = now if since is None else since
    remotes: dict[str, RemoteParty] = {}
    unsynced: list[str] = []
    settling: list[str] = []
    ignored: list[str] = []
    for peer in sorted(peers, key=peer_key):
        key, party_of_peer = peer_key(peer), peer.spec.party
        record = records.get(key)
        failure = failures.get(key)
        if record is not None and record.party != party_of_peer:
            failure = "PartyMismatch"
        distrusted = failure in TRUST_FAILURES
        if not distrusted and (record is None or record.at < since) and now - since < ttl_s:
            settling.append(key[1])
        if record is None or now - record.at > ttl_s or distrusted:
            unsynced.append(f"{key[1]} ({failure or 'NotSynced'})")
            continue
        info = record.message.federation(federation)
        if info is None or party_of_peer in remotes:
            continue
        members = own_members(party_of_peer, info.members)
        if len(members) < len(info.members):
            ignored.append(
                f"{len(info.members) - len(members)} members that party {party_of_peer} "
                "announced in another party's name"
            )
        remotes[party_of_peer] = RemoteParty(
            party=party_of_peer,
            members=members,
            replicas=info.replicas,
            admits_us=info.admitted,
            max_workers=info.max_workers,
            we_admit=peer.spec.policy.may_contribute_workers,
            starting=info.starting,
            terms=JobTerms.heard(info),
        )
    return FederationView(
        party=party,
        remotes=tuple(remotes.values()),
        unsynced=tuple(unsynced),
        peers=len(peers),
        settling=tuple(settling),
        ignored=tuple(ignored),
    )


def synced_condition(view: FederationView) -> tuple[str, str, str]:
    """(status, reason, message) of a job's `FederationSynced` condition."""
    if view.disagreeing:
        order = [reason for _, reason, _ in _TERMS]  # the most telling difference names it
        reason = min((reason for reason, _ in view.disagreeing), key=order.index)
        texts = [text for _, text in view.disagreeing]
        return "False", reason, "; ".join(texts) + " (left out)"
    if view.unsynced:
        return "False", "PeersNotSynced", "no recent exchange with " + ", ".join(view.unsynced)
    if not view.peers:
        return "True", "NoPeers", "no ChaosPeer in this namespace; the job trains alone"
    parties = ", ".join(sorted(r.party for r in view.remotes)) or "none"
    limits = "".join(
        f"; party {r.party} admits at most {r.max_workers} of our workers"
        for r in sorted(view.remotes, key=lambda r: r.party)
        if r.admits_us and r.max_workers is not None
    )
    ignored = "".join(f"; ignored: {what}" for what in view.ignored)
    return (
        "True",
        "Synced",
        (
            f"synced with every peer; parties in this federation: {parties}; "
            f"{view.remote_members()} remote members{limits}{ignored}"
        ),
    )


@dataclass(frozen=True)
class ExchangeOutcome:
    """Result of the latest exchange with a peer."""

    ok: bool
    reason: str
    message: str
    party: str | None = None


def remote_members_here(peer: ChaosPeer, record: PeerRecord | None, federations: set[str]) -> int:
    """Workers of the peer's party in this party's federations (our jobs in its namespace)."""
    if record is None or record.party != peer.spec.party:
        return 0
    return sum(
        len(own_members(record.party, f.members))
        for f in record.message.federations
        if f.name in federations
    )


def peer_status(
    previous: Mapping[str, Any],
    outcome: ExchangeOutcome,
    *,
    members: int,
    generation: int | None,
    now: datetime,
) -> tuple[dict[str, Any], tuple[str, str, str] | None]:
    """A ChaosPeer's new status and the Event to post (reason, message, type) when the
    `Federated` condition changed."""
    status: dict[str, Any] = {"reachable": outcome.ok, "members": members if outcome.ok else 0}
    if outcome.ok:
        status["lastHandshakeTime"] = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    elif "lastHandshakeTime" in previous:
        status["lastHandshakeTime"] = previous["lastHandshakeTime"]
    if generation is not None:
        status["observedGeneration"] = generation
    state = "True" if outcome.ok else "False"
    status["conditions"] = set_condition(
        previous.get("conditions", []),
        "Federated",
        state,
        outcome.reason,
        outcome.message,
        generation,
        now,
    )
    old = next((c for c in previous.get("conditions", []) if c.get("type") == "Federated"), None)
    event = None
    if old is None or (old.get("status"), old.get("reason")) != (state, outcome.reason):
        event = (outcome.reason, outcome.message, "Normal" if outcome.ok else "Warning")
    return status, event


def status_unchanged(
    previous: Mapping[str, Any], status: Mapping[str, Any], refresh_s: float = 30.0
) -> bool:
    """Whether writing a ChaosPeer's `status` can be skipped: nothing differs but the
    handshake time, and that by less than `refresh_s`."""

    def strip(s: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in s.items() if k != "lastHandshakeTime"}

    if strip(previous) != strip(status):
        return False
    old, new = previous.get("lastHandshakeTime"), status.get("lastHandshakeTime")
    if old == new:
        return True
    if old is None or new is None:
        return False
    fmt = "%Y-%m-%dT%H:%M:%SZ"
    age = datetime.strptime(new, fmt) - datetime.strptime(old, fmt)
    return age.total_seconds() < refresh_s
