"""Pure reconcile of a `ChaosJob`: observed pods in, desired pods, deletions and status out.

No I/O and no clock: the caller passes `now` and what it observed, and applies the `PodPlan`
(`chaos_operator.controller.apply_plan`, on Kubernetes or on local processes). The same input
always gives the same plan. How a member is named, addressed and packed into a pod is
`chaos_operator.pods`.

Rules:

* One pod per member; the member id is the pod name `<job>-w<ordinal>`. Ordinals only grow:
  the job's annotation `chaos.training.dev/next-member` remembers the next one, so an id is
  never reused (the data plane admits a returning id only as a newcomer if it is new).
* Keep `spec.replicas` live pods (Pending, Running or Unknown, not being deleted). A pod that
  ended (Failed, or Succeeded while the job goes on) is a lost member: it is deleted and a
  new member replaces it.
* New members join through a live member (`join: <seed address>`), the oldest running one.
  When no member is live (a new job, or every member lost), the new members form a fresh
  initial set: each starts with `members` = all of them.
* Scaling down deletes the newest members (the checkpoint writer last).
* Warm spares (`spec.spares`, `chaos_operator.spares`): spare pods in standby are kept
  topped up while the job trains; a newcomer (a replacement, a scale-up) is a spare made a
  member by a patch where one is live, else a new pod. Spares are no members: they are not
  in `replicas`, their loss is no Event and no failure, and they go when training ends.
* Checkpoints (`spec.checkpoints`): one live member of the party is the writer (it mounts
  the claim); when none is, the first member created becomes it. An initial set formed
  after every member was lost (ordinals were used before) is the writer alone, resuming
  from the newest checkpoint that verifies; the other new members join through it.
  Any such later initial set restarts `currentStep` (it is unknown until the members
  report). `chaos_operator.durable` keeps `durableStep`, `resumedFrom`, `finalCheckpoint`.
* Federation (when the operator has an identity and passes a `FederationView`): member ids
  carry the party (`<party>.<pod>`), so ids of different parties never clash. A party with no
  live member joins through a remote member (of the smallest party that admits all the
  workers it adds) instead of forming an initial set. With no member anywhere, the initial
  set is formed by the smallest party name among the parties that want workers and admit
  each other's; the others wait (`Ready` False, `WaitingForSeed`) until its members run, for
  at most `options.seed_wait_s` after `Ready` turned False; then they form their own set (a
  Warning Event says why). Nothing a remote party sends changes how many workers this party
  runs (`spec.replicas` alone), and nothing is ever created or deleted for another party.
* The job is Succeeded once every pod it has ended with Succeeded and training reached its
  last step (or the step is unknown), or the last step is done and no pod is left; then
  nothing is created any more. Every pod ended with Succeeded short of the last step is a
  loss of every member, not a success. Once the current step is the last one (`spec.steps`,
  else `options.steps`), members that end are not replaced either: they are finishing.
* Lifecycle (`chaos_operator.lifecycle`): a suspended job and a Failed one (deadline,
  failure policy) have no pods; Succeeded and Failed never change again; a finished job
  with `ttlSecondsAfterFinished` is deleted once that has passed. Conditions `Suspended`,
  `Complete` and `Failed` and an Event on each transition say why.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from chaos_operator.api import ChaosJob
from chaos_operator.api.conditions import set_condition
from chaos_operator.durable import DurableReading, durable_status
from chaos_operator.federation.rules import FederationView, job_terms, synced_condition
from chaos_operator.lifecycle import Lifecycle, decide
from chaos_operator.observed import ObservedPod, PodEvent
from chaos_operator.pods import (
    ANN_NEXT_MEMBER,
    Options,
    checkpoint_claim,
    claim_name,
    headless_service,
    job_meta,
    job_steps,
    member_address,
    member_id,
    member_name,
    selector,
    worker_config,
    worker_pod,
)
from chaos_operator.spares import plan_spares, usable

DEFAULT_OPTIONS = Options()
NO_READING = DurableReading()
ConditionState = tuple[str, str, str]
"""(status, reason, message) of one status condition."""


@dataclass(frozen=True)
class PodPlan:
    """What to do: create pods, delete pods, ensure the Service, write status."""

    create: list[dict[str, Any]]
    delete: list[str]
    service: dict[str, Any]
    status: dict[str, Any]
    next_member: int
    events: dict[str, PodEvent]
    """Keyed by the pod name whose creation, deletion or activation the event reports (a
    spare's deletion has none)."""
    job_events: list[PodEvent] = field(default_factory=list)
    """About the job itself (suspended, resumed, failed, succeeded): posted with the status."""
    delete_job: bool = False
    """Delete the ChaosJob (its TTL after finishing ran out)."""
    claim: dict[str, Any] | None = None
    """The checkpoint claim to create unless it exists (`pods.checkpoint_claim`)."""
    activate: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Spare pod name -> the patch that makes it a member (`spares.activation`)."""


def running_members(pods: Sequence[ObservedPod]) -> dict[str, str]:
    """Running members that have an address: id -> trainer address (what peers are told);
    spares are no members."""
    return {p.member: p.address for p in pods if p.running and p.address and not p.spare}


def next_member(job: ChaosJob, pods: Sequence[ObservedPod]) -> int:
    """The next unused ordinal: past the job's annotation and every pod seen."""
    try:
        remembered = int(job.metadata.annotations.get(ANN_NEXT_MEMBER, "0"))
    except ValueError:
        remembered = 0
    return max([remembered, *(p.ordinal + 1 for p in pods)])


def reconcile(
    job: ChaosJob,
    pods: Sequence[ObservedPod],
    *,
    now: datetime,
    current_step: int | None = None,
    scale_out_delay_s: float | None = None,
    options: Options = DEFAULT_OPTIONS,
    federation: FederationView | None = None,
    durable: DurableReading = NO_READING,
) -> PodPlan:
    """Plan one reconcile of `job` given its observed pods (see the module docstring);
    `durable`: what the members' `/metrics` said of the checkpoints."""
    name, namespace, _ = job_meta(job)
    spec = job.spec
    want = spec.replicas  # ours alone: nothing a remote party says lowers it
    waiting: str | None = None
    gave_up: str | None = None
    previous = job.status.to_k8s() if job.status else {}
    ordinal = next_member(job, pods)
    spares = [p for p in pods if p.spare]
    pods = sorted((p for p in pods if not p.spare), key=lambda p: (p.ordinal, p.name))
    live = [p for p in pods if p.live]
    ended = [p for p in pods if not p.deleting and not p.live]
    reported = [p.final_step for p in ended if p.final_step is not None]
    if reported:  # what ended trainers said beats a scrape that missed the last steps
        current_step = max([*reported, *([] if current_step is None else [current_step])])
    step = current_step if current_step is not None else previous.get("currentStep")
    steps = job_steps(job, options)
    trained = step is not None and step >= steps - 1
    if federation is not None:  # parties whose job has other terms are left out
        federation = federation.agreeing(job_terms(job, steps))
    life = decide(
        job,
        previous,
        [(p.name, p.phase) for p in ended],
        live=len(live),
        now=now,
        trained=trained,
        step_known=step is not None,
    )
    finished = life.phase == "Succeeded"
    claim = claim_name(job)
    restarted = False  # a new initial set after every member was lost
    create: list[dict[str, Any]] = []
    delete: list[str] = []
    events: dict[str, PodEvent] = {}
    activate: dict[str, dict[str, Any]] = {}

    if life.stops:
        for pod in [*live, *ended]:
            delete.append(pod.name)
            events[pod.name] = PodEvent(
                "MemberRemoved", f"job {life.phase.lower()}: member {pod.member} stops"
            )
        live = []
    elif not finished and not trained:
        for pod in ended:
            delete.append(pod.name)
            events[pod.name] = PodEvent(
                "MemberLost", f"member {pod.member} ended ({pod.phase}); replacing it", "Warning"
            )
        surplus = len(live) - want
        if surplus > 0:
            gone = sorted(live, key=lambda p: (not p.writer, p.ordinal))[-surplus:]
            for pod in gone:
                delete.append(pod.name)
                events[pod.name] = PodEvent("MemberRemoved", f"scaled down: member {pod.member}")
            live = [p for p in live if p not in gone]
        missing = want - len(live)
        seeds = [p for p in live if p.address]
        seeds.sort(key=lambda p: (not p.running, p.ordinal))
        remote = federation.seed(want) if federation and not seeds else None
        if missing > 0 and not seeds and not remote and federation:
            waiting = federation.waiting_for(want)
            if waiting and not_ready_s(previous, now) >= options.seed_wait_s:
                gave_up, waiting = waiting, None
            elif waiting:
                waiting += f" (a wait of at most {options.seed_wait_s:g} s)"
        if missing > 0 and not waiting:
            joins = (seeds[0].member, seeds[0].address) if seeds else None
            if remote:
                joins = (f"{remote[1]} of party {remote[0].party}", remote[2])
            needs_writer = bool(claim) and not any(p.writer for p in live)
            # warm spares first, for newcomers only: the writer is a new pod (its claim)
            taken = usable(spares, joins[1])[: missing - needs_writer] if joins else []
            for spare, patch in taken:
                activate[spare.name] = patch
                events[spare.name] = PodEvent(
                    "MemberAdded", f"member {spare.member} (a warm spare) joins through {joins[0]}"
                )
            missing -= len(taken)
            new = list(range(ordinal, ordinal + missing))
            writer = new[0] if needs_writer else None
            initial = [] if joins else new
            restarted = not joins and not live and ordinal > 0
            if restarted and writer is not None:  # the writer resumes; the others join it
                initial = [writer]
                joins = (
                    member_id(name, writer, options),
                    member_address(name, namespace, writer, options),
                )
            members = {
                member_id(name, n, options): member_address(name, namespace, n, options)
                for n in initial
            }
            note = f" after waiting {options.seed_wait_s:g} s for: {gave_up}" if gave_up else ""
            for n in new:
                if n in initial:
                    config = worker_config(job, n, options, members=members, writer=n == writer,
                                           resume=restarted)  # fmt: skip
                    what = f"starts the initial set of {len(initial)}{note}"
                    if restarted and writer is not None:
                        what = f"resumes from the newest checkpoint on claim {claim}{note}"
                    event = PodEvent("MemberAdded", f"member {member_name(name, n)} {what}",
                                     "Warning" if gave_up else "Normal")  # fmt: skip
                else:
                    assert joins is not None
                    config = worker_config(job, n, options, join=joins[1], writer=n == writer)
                    event = PodEvent(
                        "MemberAdded",
                        f"member {member_id(name, n, options)} joins through {joins[0]}",
                    )
                create.append(worker_pod(job, n, config))
                events[member_name(name, n)] = event
            ordinal += missing

    members_added = len(create) + len(activate)
    training = not life.stops and not finished and not trained
    spare = plan_spares(
        job, spares, taken=set(activate), training=training, ordinal=ordinal, options=options
    )
    create += spare.create
    delete += spare.delete
    events.update(spare.events)
    ordinal = spare.next_member
    if restarted:  # training starts again (from a checkpoint, or from step 0)
        previous = {k: v for k, v in previous.items() if k != "currentStep"}
        current_step = None
    status = job_status(
        job,
        previous,
        pods,
        live,
        ended,
        want=want,
        finished=finished,
        trained=trained,
        creating=members_added,
        now=now,
        current_step=current_step,
        scale_out_delay_s=scale_out_delay_s,
        federation=federation,
        waiting=waiting,
    )
    status = lifecycle_status(job, status, life, steps, now)
    if job.spec.spares or spares:
        status["spares"] = spare.status
    job_events = [PodEvent(*life.event)] if life.event else []
    if claim:
        written = [p.final_checkpoint for p in ended if p.final_checkpoint is not None]
        newest = max([*written, durable.checkpoint_step or 0]) or None
        fields, notes = durable_status(
            previous,
            DurableReading(newest, durable.resumed_step, durable.skipped),
            claim=claim,
            restarted=restarted,
            succeeded=finished,
            steps=steps,
            now=now,
        )
        status.update(fields)
        job_events += [PodEvent(*note) for note in notes]
    return PodPlan(
        create=create,
        delete=delete,
        service=headless_service(job),
        status=status,
        next_member=ordinal,
        events=events,
        job_events=job_events,
        delete_job=life.delete_job,
        claim=checkpoint_claim(job),
        activate=activate,
    )


def lifecycle_status(
    job: ChaosJob, status: dict[str, Any], life: Lifecycle, steps: int, now: datetime
) -> dict[str, Any]:
    """`status` with the lifecycle's phase, conditions, times, failures and progress."""
    out = {k: v for k, v in status.items() if k not in ("startTime", "completionTime")}
    out.pop("memberFailures", None)
    out.update(life.status)
    out["steps"] = steps
    done = out.get("currentStep")
    out["progress"] = f"{0 if done is None else min(done + 1, steps)}/{steps}"
    generation = job.metadata.generation
    conditions = out["conditions"]
    suspended = life.phase == "Suspended"
    if suspended or any(c.get("type") == "Suspended" for c in conditions):
        # as a Kubernetes Job's: present once the job was ever suspended
        conditions = set_condition(
            conditions,
            "Suspended",
            "True" if suspended else "False",
            "JobSuspended" if suspended else "JobResumed",
            life.message if suspended else "spec.suspend is false",
            generation,
            now,
        )
    if life.phase in ("Succeeded", "Failed"):
        kind = "Complete" if life.phase == "Succeeded" else "Failed"
        conditions = set_condition(
            conditions, kind, "True", life.reason, life.message, generation, now
        )
        reason = "TrainingFinished" if life.phase == "Succeeded" else life.reason
        conditions = set_condition(
            conditions, "Ready", "False", reason, life.message, generation, now
        )
    if life.phase is not None:
        out["phase"] = life.phase
    if suspended:
        conditions = set_condition(
            conditions, "Ready", "False", "JobSuspended", "the job is suspended", generation, now
        )
    out["conditions"] = conditions
    return out


def not_ready_s(previous: Mapping[str, Any], now: datetime) -> float:
    """Seconds since the job's `Ready` condition turned False (0 when it is not False)."""
    ready = next((c for c in previous.get("conditions", []) if c.get("type") == "Ready"), None)
    if ready is None or ready.get("status") != "False":
        return 0.0
    try:
        since = datetime.strptime(ready["lastTransitionTime"], "%Y-%m-%dT%H:%M:%SZ")
    except (KeyError, TypeError, ValueError):
        return 0.0
    return (now - since.replace(tzinfo=UTC)).total_seconds()


def job_status(
    job: ChaosJob,
    previous: Mapping[str, Any],
    pods: Sequence[ObservedPod],
    live: Sequence[ObservedPod],
    ended: Sequence[ObservedPod],
    *,
    want: int,
    finished: bool,
    trained: bool,
    creating: int,
    now: datetime,
    current_step: int | None,
    scale_out_delay_s: float | None,
    federation: FederationView | None = None,
    waiting: str | None = None,
) -> dict[str, Any]:
    """The job's whole `status` after a reconcile that keeps `live` and creates `creating`.

    `pods` is every pod observed, `ended` those that ended; `previous` is the job's status
    before, whose `lastTransitionTime`s, step and autoscaling block carry over.
    """
    generation = job.metadata.generation
    running = sum(1 for p in live if p.running)
    observed_live = sum(1 for p in pods if p.live)
    phase, ready, degraded = _health(
        previous,
        live,
        ended,
        running=running,
        observed_live=observed_live,
        generation=generation,
        want=want,
        finished=finished,
        trained=trained,
        creating=creating,
        waiting=waiting,
    )
    changes = [("Degraded", degraded), ("Ready", ready)]
    if federation is not None:
        changes.append(("FederationSynced", synced_condition(federation)))
    conditions = previous.get("conditions", [])
    for type_, (status, reason, message) in changes:
        conditions = set_condition(conditions, type_, status, reason, message, generation, now)
    out: dict[str, Any] = {
        "phase": phase,
        "conditions": conditions,
        "replicas": len(live) + creating,
        "selector": selector(job.metadata.name or ""),
        "localMembers": running,
    }
    if generation is not None:
        out["observedGeneration"] = generation
    step = current_step if current_step is not None else previous.get("currentStep")
    if step is not None:
        out["currentStep"] = max(step, previous.get("currentStep", 0))
    for key in ("remoteMembers", "lastScaleOutDelaySeconds", "lastScaleTime", "autoscaling"):
        if key in previous:
            out[key] = previous[key]
    if scale_out_delay_s is not None:
        out["lastScaleOutDelaySeconds"] = round(scale_out_delay_s, 3)
    if federation is not None:
        out["remoteMembers"] = federation.remote_members()
    if creating or len(live) != observed_live:
        out["lastScaleTime"] = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    return out


def _health(
    previous: Mapping[str, Any],
    live: Sequence[ObservedPod],
    ended: Sequence[ObservedPod],
    *,
    running: int,
    observed_live: int,
    generation: int | None,
    want: int,
    finished: bool,
    trained: bool,
    creating: int,
    waiting: str | None,
) -> tuple[str, ConditionState, ConditionState]:
    """(phase, Ready, Degraded) of the job."""
    counts = f"{running} of {want} members running"
    if finished:
        done = ("False", "TrainingFinished", "every member finished its last step")
        return "Succeeded", done, ("False", "TrainingFinished", "training finished")
    if trained:
        done = ("False", "TrainingFinished", "the last step is done; members are finishing")
        return "Running", done, ("False", "TrainingFinished", "training finished")
    if running == want and len(live) == want and not creating and not ended:
        phase = "Running" if want > 0 else "Paused"
        return phase, ("True", "MembersRunning", counts), ("False", "AsExpected", counts)
    # Pods that vanished since the last status (e.g. `kubectl delete pod`) with no spec change.
    vanished = (
        previous.get("observedGeneration") == generation
        and previous.get("replicas", 0) > observed_live
    )
    if ended or vanished or previous.get("phase") == "Recovering":
        phase = "Recovering"
    elif running == 0 and previous.get("phase", "Pending") == "Pending":
        phase = "Pending"
    else:
        phase = "Scaling"
    reason = "MembersStarting" if len(live) + creating >= want else "MembersMissing"
    ready = ("False", reason, counts)
    if waiting:
        ready = ("False", "WaitingForSeed", f"{waiting}; {counts}")
    if ended:
        members = ", ".join(p.member for p in ended)
        degraded = ("True", "MemberLost", f"lost {members}; replacements are joining")
    elif phase == "Recovering":
        degraded = ("True", "MemberLost", f"replacing lost members; {counts}")
    else:
        degraded = ("False", "AsExpected", counts)
    return phase, ready, degraded
