"""Random churn schedules for `chaos soak` (pure): one per round, every kind of event.

A round's schedule is a sequence of *episodes* in random order, each at a random step:

- `join`: `join@S` (the next worker, `w<next>`);
- `leave`: `leave:wK@S`;
- `crash` or `hang` (the round's *loss*): `crash:wK@S` on even rounds, `hang:wK@S` on
  odd ones;
- `pause`: `pause:wK@S`; the worker is removed, wakes and rejoins by itself;
- `cut`: `link-down:wA-wB@S`, then `link-up:wA-wB` a few steps later;
- `partition`: at one step, `link-down` of every link between one party's members and
  the rest; `link-up` of all of them later.

Episodes do not interleave, and after the last event of one, `SETTLE` steps (about the
time its handling takes) pass before the next begins. At most one member is lost for
good a round (the crash or hang), the leave is balanced by the join, and a partition
cuts off a party holding fewer than half of the members, so a majority always trains
on. A pause comes early enough that its worker rejoins before the last step. Every
schedule is checked by `parse_churn`; a draw it refuses is drawn again.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from chaos_cli.local.churn import ChurnError, ChurnEvent, parse_churn

EPISODES = ("join", "leave", "loss", "pause", "cut", "partition")
"""Episodes of every round; `loss` is the round's crash or hang."""
SETTLE = {"join": 20, "leave": 10, "loss": 40, "pause": 60, "cut": 15, "partition": 40}
"""Steps after an episode's last event before the next one begins: about the seconds its
handling takes (a pause: stopped 2.5 failure timeouts, then a rejoin) at 20 steps/s."""
SPAN = {"cut": (5, 25), "partition": (15, 40)}
"""Steps between an episode's link-down and its link-up (drawn in this range)."""
LATEST_PAUSE = 0.6
"""A pause comes by this fraction of the round, so that its worker rejoins before the end."""
MIN_STEPS = 300
"""The fewest steps a round needs to fit every episode with room to settle."""
PARTIES = 3
DRAWS = 100


class PlanError(ValueError):
    """No valid schedule for these settings (e.g. too few steps a round)."""


@dataclass
class Schedule:
    """One round's churn: the `--churn` spec, its parsed events, episodes by kind."""

    spec: str
    events: list[ChurnEvent]
    episodes: Counter = field(default_factory=Counter)


def party_of(worker: str) -> int:
    """Worker `w<i>` belongs to party `i mod 3` (the `@three-party` profile's rule:
    joiners are numbered after the initial workers)."""
    return int(worker[1:]) % PARTIES


def draw_schedule(seed: int, round_index: int, workers: int, steps: int) -> Schedule:
    """The schedule of round `round_index` of a soak with `seed`, for `workers` initial
    workers and `steps` steps; the same arguments always give the same schedule."""
    if steps < MIN_STEPS:
        raise PlanError(f"a soak round needs at least {MIN_STEPS} steps, not {steps}")
    if workers < PARTIES * 2:
        raise PlanError(f"a soak needs at least {PARTIES * 2} workers (two a party)")
    rng = random.Random(seed + round_index)
    loss = "crash" if round_index % 2 == 0 else "hang"
    for _ in range(DRAWS):
        drawn = _draw(rng, workers, steps, loss)
        if drawn is None:
            continue
        spec, episodes = drawn
        try:
            events = parse_churn(spec, workers)
        except ChurnError:
            continue
        if all(0 < e.step < steps for e in events):
            return Schedule(spec, events, episodes)
    raise PlanError(f"no valid schedule in {DRAWS} draws for {workers} workers, {steps} steps")


def _draw(rng: random.Random, workers: int, steps: int, loss: str) -> tuple[str, Counter] | None:
    """One attempt: episodes in random order at random steps; None when it does not fit."""
    order = list(EPISODES)
    rng.shuffle(order)
    spans = {e: rng.randint(*SPAN[e]) if e in SPAN else 0 for e in order}
    first, last = max(5, steps // 40), steps - max(30, steps // 5)
    needed = sum(spans.values()) + sum(SETTLE[e] for e in order[:-1])
    slack = last - first - needed
    if slack < 0:
        return None
    offsets = sorted(rng.randint(0, slack) for _ in order)
    members = [f"w{i}" for i in range(workers)]
    joined = workers
    items: list[str] = []
    episodes: Counter = Counter()
    used = first
    for episode, offset in zip(order, offsets, strict=True):
        step = used + offset
        used += spans[episode] + SETTLE[episode]
        if episode == "pause" and step > steps * LATEST_PAUSE:
            return None  # too late to rejoin before the end
        kind = loss if episode == "loss" else episode
        if episode == "join":
            items.append(f"join@{step}")
            members.append(f"w{joined}")
            joined += 1
        elif episode in ("leave", "loss", "pause"):
            target = rng.choice(members)
            items.append(f"{kind}:{target}@{step}")
            if episode != "pause":
                members.remove(target)
        elif episode == "cut":
            a, b = rng.sample(members, 2)
            items += [f"link-down:{a}-{b}@{step}", f"link-up:{a}-{b}@{step + spans[episode]}"]
        else:
            links = _partition(rng, members)
            if not links:
                return None
            up = step + spans[episode]
            items += [f"link-down:{a}-{b}@{step}" for a, b in links]
            items += [f"link-up:{a}-{b}@{up}" for a, b in links]
        episodes[kind] += 1
    return ",".join(items), episodes


def _partition(rng: random.Random, members: list[str]) -> list[tuple[str, str]]:
    """Every link between one party (fewer than half of the members) and the rest, the
    party's member first; none when no party is such a minority."""
    parties = {p: [m for m in members if party_of(m) == p] for p in range(PARTIES)}
    minorities = [p for p, inside in parties.items() if 0 < 2 * len(inside) < len(members)]
    if not minorities:
        return []
    inside = parties[rng.choice(minorities)]
    return [(a, b) for a in inside for b in members if b not in inside]
