"""Churn schedules for `chaos run --churn`: which event happens to whom at which step.

Syntax: comma-separated items, each `KIND:TARGET@STEP`; numbers are training steps (the
event is injected when the job first reports reaching that step):

    leave:w2@40            graceful leave (scale-in)
    crash:w1@80            SIGKILL, no goodbye
    hang:w1@80             SIGSTOP: a silent crash, found by heartbeat timeout
    pause:w1@80            SIGSTOP, SIGCONT after PAUSE_TIMEOUTS failure timeouts: a false
                           suspicion; the worker is removed, wakes and rejoins by itself
    link-down:w0-w3@100    the link between w0 and w3 goes down
    link-up:w0-w3@120      and comes back
    join@150               a new worker joins (named w<next>); join:w9@150 names it

`none` (or an empty string) means no churn.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

KINDS = ("leave", "crash", "hang", "pause", "link-down", "link-up", "join")
PAUSE_TIMEOUTS = 2.5
"""How long a `pause` stops its worker, in failure timeouts: long enough to be suspected
and removed, short enough that it wakes while the job still runs."""
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
    if workers < 3 or steps < 3:  # no step before the last one for a join
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

    Events happen in step order (ties in the written order): an event may not name a
    worker that has not joined yet or has already crashed, hung or left (a paused worker
    comes back, so later events may name it), a link goes down
    before it comes up, and at least one worker is left at every step unless every worker
    leaves on request (scale to zero).

    `reconciled`: members are named by the reconcile of a ChaosJob (`chaos run FILE`), in
    step order: a crashed member is replaced by a new one, `w<next>`, and so is each join,
    which therefore cannot name its worker.
    """
    spec = spec.strip()
    if spec in ("", "none"):
        return []
    items = sorted((_parse_item(raw.strip()) for raw in spec.split(",")), key=lambda i: i[2])
    events: list[ChurnEvent] = []
    known = {f"w{i}" for i in range(workers)}
    gone: dict[str, str] = {}  # worker -> what became of it, e.g. "crashed at step 80"
    down: set[frozenset[str]] = set()
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
            continue
        ends = target.split("-") if kind.startswith("link-") and target else [target]
        if kind.startswith("link-") and (len(ends) != 2 or ends[0] == ends[1]):
            raise ChurnError(f"--churn: {item!r} needs two different workers, e.g. w0-w3")
        if not target:
            raise ChurnError(f"--churn: {item!r} needs a worker, e.g. {kind}:w1@{step}")
        for end in ends:
            if end not in known:
                raise ChurnError(
                    f"--churn: {item!r} names {end}, which is not a worker of this job "
                    f"by step {step}"
                )
        for end in ends:
            if end in gone:
                raise ChurnError(f"--churn: {item!r} names {end}, which {gone[end]}")
        if kind.startswith("link-"):
            link = frozenset(ends)
            if (kind == "link-down") == (link in down):
                state = "already down" if link in down else "not down"
                raise ChurnError(f"--churn: {item!r}: the link {target} is {state} by then")
            down ^= {link}
            events.append(ChurnEvent(kind, step, ends[0], ends[1]))
            continue
        events.append(ChurnEvent(kind, step, target))
        if kind == "pause":  # it wakes and comes back: later events may name it
            continue
        gone[target] = f"{_PAST[kind]} at step {step}"
        if reconciled and kind == "crash":  # its replacement
            known.add(f"w{joined}")
            joined += 1
        if len(known) == len(gone) and not _scales_to_zero(events, reconciled):
            raise ChurnError(f"--churn: {item!r} leaves no worker to train")
    return events


_PAST = {"crash": "crashed", "hang": "hung", "leave": "left"}


def _scales_to_zero(events: list[ChurnEvent], reconciled: bool) -> bool:
    """Every worker left on request, none crashed or hung: the job ends cleanly, scaled to
    zero (a ChaosJob cannot: its minReplicas is at least 1)."""
    return not reconciled and all(e.kind not in ("crash", "hang") for e in events)


def _parse_item(item: str) -> tuple[str, str, int, str]:
    """`(kind, target, step, item)` of one `KIND:TARGET@STEP` item."""
    match = _ITEM.match(item)
    if not match:
        raise ChurnError(f"--churn: {item!r} is not KIND:TARGET@STEP (e.g. crash:w1@80)")
    kind = match["kind"]
    if kind not in KINDS:
        raise ChurnError(f"--churn: unknown event {kind!r} in {item!r}; use one of {KINDS}")
    return kind, match["target"] or "", int(match["step"]), item
