"""Whether a local run did what it should, beyond completing its steps (pure functions).

A run that completed every step can still have gone wrong without any error in a
worker: members that end on different training states, a member dropped that no
injected event explains, a member nobody started. `problems` names each; `chaos run`
prints them and exits 1.
"""

from __future__ import annotations

from collections.abc import Iterable

from chaos_cli.local.churn import ChurnEvent

EXPLAINED = ("leave", "crash", "hang")
"""Churn kinds that take their worker out of the job."""


def problems(
    *,
    steps: int,
    completed: int,
    digests: dict[str, str],
    finishers: Iterable[str],
    members: Iterable[str],
    started: Iterable[str],
    rejoining: Iterable[str] = (),
    fired: Iterable[ChurnEvent],
    changes: list[dict],
) -> list[str]:
    """What went wrong in a run of `steps` steps that completed `completed` of them.

    `digests`: each worker's final state digest; `finishers`: the workers that completed
    the last step; `members`: every worker named in an agreed view; `started`: the
    worker processes the run started; `rejoining`: the live workers that were waiting
    to be admitted again when the run ended; `fired`: the churn injected; `changes`: the
    membership changes (`Timeline.membership_changes`).
    """
    found = []
    scaled_to_zero = bool(changes) and not changes[-1]["members"]
    if completed < steps and not scaled_to_zero:
        found.append(f"only {completed} of {steps} steps completed")
    finished = set(finishers)
    ends = {digests[w] for w in finished if w in digests}
    if len(ends) > 1:
        shown = ", ".join(f"{w} {digests[w][:12]}" for w in sorted(finished) if w in digests)
        found.append(f"members ended on different training states ({shown})")
    outsiders = sorted(set(members) - set(started))
    if outsiders:
        found.append(f"members this run did not start took part: {', '.join(outsiders)}")
    explained = {e.worker for e in fired if e.kind in EXPLAINED}
    # a worker paused past the failure timeout is removed and rejoins by itself; one that
    # woke too near the end was still asking to be admitted when the last step completed
    explained |= {e.worker for e in fired if e.kind == "pause"} & set(rejoining)
    for index, change in enumerate(changes):
        for worker in change["removed"]:
            back = any(worker in later["added"] for later in changes[index + 1 :])
            cut = any(c.startswith("link_down:") for c in change["causes"])  # a minority
            if worker in explained or back or cut:
                continue
            causes = ", ".join(change["causes"]) or "no cause recorded"
            found.append(
                f"{worker} was removed at step {change['step']} ({causes}) by no injected "
                "event and did not come back"
            )
    return found
