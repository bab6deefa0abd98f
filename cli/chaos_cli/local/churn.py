"""Churn schedules for `chaos run --churn`: which event happens to whom at which step.

Syntax: comma-separated items, each `KIND:TARGET@STEP`; numbers are training steps (the
event is injected when the job first reports reaching that step):

    leave:w2@40            graceful leave (scale-in)
    crash:w1@80            SIGKILL, no goodbye
    hang:w1@80             SIGSTOP: a silent crash, found by heartbeat timeout
    link-down:w0-w3@100    the link between w0 and w3 goes down
    link-up:w0-w3@120      and comes back
    join@150               a new worker joins (named w<next>); join:w9@150 names it

`none` (or an empty string) means no churn.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

KINDS = ("leave", "crash", "hang", "link-down", "link-up", "join")
_ITEM = re.compile(
    r"^(?P<kind>[a-z-]+)(?::(?P<target>[A-Za-z0-9_.-]+(?:-[A-Za-z0-9_.]+)?))?@(?P<step>\d+)$"
)


class ChurnError(ValueError):
    """A churn schedule that does not parse or names unknown workers."""


@dataclass(frozen=True)
class ChurnEvent:
    kind: str
    step: int
    worker: str = ""
    peer: str = ""

    @property
    def label(self) -> str:
        who = f"{self.worker}-{self.peer}" if self.peer else self.worker
        return f"{self.kind}:{who}@{self.step}"


def default_churn(workers: int, steps: int) -> str:
    """A schedule that shows every event kind once, scaled to the job's length."""
    if workers < 3:
        return "none"
    if workers == 3:  # too few to lose two members and keep a link to cut
        return f"crash:w1@{max(1, steps * 2 // 5)},join@{max(2, steps * 4 // 5)}"
    at = [max(1, steps * k // 10) for k in (2, 4, 5, 6, 8)]
    last = f"w{workers - 1}"
    return (
        f"leave:w{workers - 2}@{at[0]},crash:w1@{at[1]},link-down:w0-{last}@{at[2]},"
        f"link-up:w0-{last}@{at[3]},join@{at[4]}"
    )


def parse_churn(spec: str, workers: int, *, reconciled: bool = False) -> list[ChurnEvent]:
    """Parse and check a schedule against the initial workers w0..w{workers-1}.

    `reconciled`: members are named by the reconcile of a ChaosJob (`chaos run FILE`), in
    step order: a crashed member is replaced by a new one, `w<next>`, and so is each join,
    which therefore cannot name its worker.
    """
    spec = spec.strip()
    if spec in ("", "none"):
        return []
    items: list[tuple[str, str, int, str]] = []
    for raw in spec.split(","):
        item = raw.strip()
        match = _ITEM.match(item)
        if not match:
            raise ChurnError(f"--churn: {item!r} is not KIND:TARGET@STEP (e.g. crash:w1@80)")
        kind, target, step = match["kind"], match["target"] or "", int(match["step"])
        if kind not in KINDS:
            raise ChurnError(f"--churn: unknown event {kind!r} in {item!r}; use one of {KINDS}")
        items.append((kind, target, step, item))
    if reconciled:
        items.sort(key=lambda i: i[2])
    events: list[ChurnEvent] = []
    known = {f"w{i}" for i in range(workers)}
    joined = workers
    for kind, target, step, item in items:
        if kind == "join":
            name = target or f"w{joined}"
            if reconciled and target and target != f"w{joined}":
                raise ChurnError(
                    f"--churn: {item!r}: the reconcile names new members; write join@{step} "
                    f"(it will be w{joined})"
                )
            joined += 1
            if name in known:
                raise ChurnError(f"--churn: {item!r} joins {name}, which already exists")
            known.add(name)
            events.append(ChurnEvent("join", step, name))
        elif kind.startswith("link-"):
            ends = target.split("-") if target else []
            if len(ends) != 2 or ends[0] == ends[1]:
                raise ChurnError(f"--churn: {item!r} needs two different workers, e.g. w0-w3")
            for end in ends:
                _check_known(end, known, item)
            events.append(ChurnEvent(kind, step, ends[0], ends[1]))
        else:
            if not target:
                raise ChurnError(f"--churn: {item!r} needs a worker, e.g. {kind}:w1@{step}")
            _check_known(target, known, item)
            events.append(ChurnEvent(kind, step, target))
            if reconciled and kind == "crash":  # its replacement
                known.add(f"w{joined}")
                joined += 1
    return sorted(events, key=lambda e: e.step)


def _check_known(worker: str, known: set[str], item: str) -> None:
    if worker not in known:
        raise ChurnError(f"--churn: {item!r} names {worker}, which is not a worker of this job")
