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
* `steps`: the length of the sender's job. Every party must train the same number of steps
  (the job ends at the same reduced step everywhere); a party that says another number is
  left out of the job's view (`FederationView.agreeing`): we neither join through it nor
  wait for it, and `FederationSynced` is False with reason `StepsMismatch`;
* `bucketBytes`: the size of the sender's all-reduce buckets, said only when it is not the
  workers' default (so operators that know no such field still parse the message, and
  their silence means the default their workers use). Workers refuse buckets cut another
  way, so a party whose size differs is left out in the same way, with reason
  `BucketMismatch`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from chaos_worker.config import BUCKET_BYTES

from chaos_operator.api import ChaosPeer
from chaos_operator.api.conditions import set_condition
from chaos_operator.federation.protocol import FederationInfo, SyncMessage

#: Reasons of a `Federated` condition that is False because trust failed (not the network).
TRUST_FAILURES = frozenset(
    {"FingerprintMismatch", "CertificateInvalid", "Rejected", "PartyMismatch", "HandshakeFailed"}
)


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
    steps: int | None = None
    """The job's length (its `spec.steps`, else the operator's default)."""
    bucket_bytes: int | None = None
    """The job's all-reduce bucket (its `spec.bucketKiB`, else the workers' default)."""


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
    steps: int | None = None
    """The length of that party's job; None: it did not say (an older operator)."""
    bucket_bytes: int | None = None
    """The all-reduce bucket of that party's job; None: it did not say, so the default."""

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
    disagreeing: tuple[str, ...] = ()
    """Parties left out because their job's length or buckets differ (`agreeing`)."""
    mismatch: str = ""
    """The reason they were left out for: `StepsMismatch` (if any trains another length),
    else `BucketMismatch`."""

    def agreeing(self, steps: int, bucket_bytes: int) -> FederationView:
        """This view without the parties whose job trains another number of steps or cuts
        its all-reduce into other buckets (a length unsaid is taken as agreed, a bucket
        unsaid as the workers' default)."""
        reasons: dict[str, str] = {}
        for r in sorted(self.remotes, key=lambda r: r.party):
            theirs = r.bucket_bytes or BUCKET_BYTES
            if r.steps is not None and r.steps != steps:
                reasons[r.party] = f"party {r.party} trains {r.steps} steps, this job {steps}"
            elif theirs != bucket_bytes:
                reasons[r.party] = (
                    f"party {r.party} reduces buckets of {theirs} bytes, this job {bucket_bytes}"
                )
        if not reasons:
            return self
        length = any(r.steps is not None and r.steps != steps for r in self.remotes)
        return replace(
            self,
            remotes=tuple(r for r in self.remotes if r.party not in reasons),
            disagreeing=tuple(reasons.values()),
            mismatch="StepsMismatch" if length else "BucketMismatch",
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
    steps: dict[str, int | None] = {}
    buckets: dict[str, int | None] = {}
    for job in sorted(jobs, key=lambda j: (j.namespace, j.name)):
        if job.namespace != peer.metadata.namespace:
            continue
        members, replicas, starting = merged.setdefault(job.federation, ({}, 0, 0))
        members.update(job.members)
        merged[job.federation] = (members, replicas + job.replicas, starting + job.starting)
        steps.setdefault(job.federation, job.steps)
        buckets.setdefault(job.federation, job.bucket_bytes)
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
                steps=steps[name],
                bucket_bytes=None if buckets[name] == BUCKET_BYTES else buckets[name],
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
            steps=info.steps,
            bucket_bytes=info.bucket_bytes,
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
        return "False", view.mismatch, "; ".join(view.disagreeing) + " (left out)"
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
