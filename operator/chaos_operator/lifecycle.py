"""The job's lifecycle rules, pure: suspend, deadline, failure policy, success, TTL.

`decide` runs before the reconcile plans members. It says whether the job goes on as usual
(`Lifecycle.phase` None) or is `Suspended` (no pods), `Failed` (no pods, for good) or
`Succeeded` (nothing is created, for good), and what status and Event go with it.

Rules:

* Terminal phases are sticky: a job that Succeeded or Failed stays so, whatever happens to
  its pods afterwards; only its TTL acts (`ttlSecondsAfterFinished` after `completionTime`,
  the ChaosJob is deleted).
* `suspend: true` deletes every pod and creates none; `startTime` is cleared, so the
  deadline counts only running time since the latest resume (as a Kubernetes Job's).
* `activeDeadlineSeconds`: counted from `startTime` (set when the job runs, i.e. is not
  suspended); once past, the job Fails with reason DeadlineExceeded.
* `failurePolicy`: members that end Failed are recorded in `status.memberFailures` (by pod
  name, once each) for `windowSeconds`; more than `maxMemberFailures` of them fail the job
  with reason TooManyMemberFailures.
* Success: every pod ended with Succeeded at the last step (or the step is unknown), or the
  last step is done and no pod is left (e.g. they were deleted once finished).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from chaos_operator.api import ChaosJob

TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


@dataclass(frozen=True)
class Lifecycle:
    """What the lifecycle rules decided for one reconcile."""

    phase: str | None
    """Succeeded, Failed or Suspended; None: members are planned as usual."""
    reason: str = ""
    message: str = ""
    status: dict[str, Any] = field(default_factory=dict)
    """startTime, completionTime, memberFailures as they are now (absent keys: unset)."""
    event: tuple[str, str, str] | None = None
    """(reason, message, type) of the Event of a transition, None when nothing changed."""
    delete_job: bool = False
    """The TTL after finishing ran out: delete the ChaosJob."""

    @property
    def stops(self) -> bool:
        """Every pod goes (suspended or failed)."""
        return self.phase in ("Suspended", "Failed")


def stamp(when: datetime) -> str:
    return when.strftime(TIME_FORMAT)


def parse(value: Any) -> datetime | None:
    """A status timestamp; None when absent or malformed."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    try:
        return datetime.strptime(str(value), TIME_FORMAT).replace(tzinfo=UTC)
    except (TypeError, ValueError):
        return None


def decide(
    job: ChaosJob,
    previous: Mapping[str, Any],
    ended: Sequence[tuple[str, str]],
    *,
    live: int,
    now: datetime,
    trained: bool,
    step_known: bool,
) -> Lifecycle:
    """The lifecycle of `job` given its `previous` status, its `ended` pods ((name, phase),
    not being deleted), how many pods are `live`, and whether training reached its last step
    (`trained`; `step_known`: a step was ever measured)."""
    spec = job.spec
    was = previous.get("phase")
    kept = {k: previous[k] for k in ("startTime", "completionTime") if k in previous}
    if was in ("Succeeded", "Failed"):
        done = parse(previous.get("completionTime"))
        ttl = spec.ttl_seconds_after_finished
        expired = ttl is not None and done is not None and now >= done + timedelta(seconds=ttl)
        reason, message = _terminal_reason(previous, was)
        return Lifecycle(was, reason, message, kept, delete_job=expired)
    if spec.suspend:
        status = {k: v for k, v in kept.items() if k != "startTime"}
        event = None
        if was != "Suspended":
            event = ("Suspended", "the job is suspended: its pods are deleted", "Normal")
        return Lifecycle("Suspended", "JobSuspended", "spec.suspend is true", status, event)
    started = parse(previous.get("startTime")) or now
    status = {**kept, "startTime": stamp(started)}
    failures = _failures(job, previous, ended, now)
    if failures is not None:
        status["memberFailures"] = failures
    failed = _failed(job, started, failures, now)
    if failed is not None:
        reason, message = failed
        status["completionTime"] = stamp(now)
        return Lifecycle("Failed", reason, message, status, (reason, message, "Warning"))
    all_succeeded = bool(ended) and all(phase == "Succeeded" for _, phase in ended)
    if not live and ((all_succeeded and (trained or not step_known)) or trained):
        status["completionTime"] = stamp(now)
        message = "training reached its last step"
        return Lifecycle(
            "Succeeded", "TrainingFinished", message, status, ("Succeeded", message, "Normal")
        )
    event = None
    if was == "Suspended":
        event = ("Resumed", "the job is resumed: its members start again", "Normal")
    return Lifecycle(None, status=status, event=event)


def _terminal_reason(previous: Mapping[str, Any], phase: str) -> tuple[str, str]:
    kind = "Failed" if phase == "Failed" else "Complete"
    for c in previous.get("conditions", ()):
        if c.get("type") == kind:
            return c.get("reason", phase), c.get("message", "")
    return ("TrainingFinished", "training finished") if phase == "Succeeded" else (phase, "")


def _failures(
    job: ChaosJob, previous: Mapping[str, Any], ended: Sequence[tuple[str, str]], now: datetime
) -> list[dict[str, str]] | None:
    """Members that ended Failed within the policy's window (None: no failure policy)."""
    policy = job.spec.failure_policy
    if policy is None:
        return None
    since = now - timedelta(seconds=policy.window_seconds)
    kept = [
        {"member": f["member"], "time": stamp(when)}
        for f in previous.get("memberFailures", ())
        if (when := parse(f.get("time"))) is not None and when > since
    ]
    known = {f["member"] for f in kept}
    kept += [
        {"member": name, "time": stamp(now)}
        for name, phase in ended
        if phase == "Failed" and name not in known
    ]
    return kept[-(policy.max_member_failures + 1) :]


def _failed(
    job: ChaosJob, started: datetime, failures: list[dict[str, str]] | None, now: datetime
) -> tuple[str, str] | None:
    """(reason, message) when the job fails now."""
    deadline = job.spec.active_deadline_seconds
    if deadline is not None and (now - started).total_seconds() >= deadline:
        return "DeadlineExceeded", f"the job ran longer than activeDeadlineSeconds ({deadline})"
    policy = job.spec.failure_policy
    if policy is not None and failures is not None and len(failures) > policy.max_member_failures:
        members = ", ".join(f["member"] for f in failures)
        return (
            "TooManyMemberFailures",
            f"{len(failures)} members failed within {policy.window_seconds} s (at most "
            f"{policy.max_member_failures} allowed): {members}",
        )
    return None
