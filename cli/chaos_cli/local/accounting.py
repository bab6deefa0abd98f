"""Sample accounting of a run: which member computed which samples of every step (pure).

Every progress record names the slice of the step's sample list its member computed,
`slice: [offset, count]` (`Trainer`: the list `step_sample_ids(seed, step, G, n)` split in
sorted member-id order). Summed over the members of the step's view, the slices must
cover `[0, G)` exactly once: a gap is a sample nobody computed, an overlap one computed
twice, and two records of one (worker, step) a step applied twice.

Some members of a view contribute to a step without reporting a slice for it: a lagging
member that missed the total and applied it from the recovery's replay reports
`slice: null`, and a member that crashed (or stopped) after its gradient went up the tree
but before its record left reports nothing. Their slices are unknown, so a gap is
accepted exactly where such members sit in sorted id order, and its samples are counted
as `inferred`, not as `accounted`.

A partition can cut a step's down-pass: the members that got the total apply it, the
others redo the step in their recovery view. When the side that applied it is the
minority, it pauses at the next step and the majority's redo is the step of the job; the
minority's attempt is `orphaned` (its state is replaced by a full copy when it rejoins),
not a step computed twice. The same holds for a root paused (SIGSTOP) right after it
applied a step, before the total left it: the others remove it and redo the step.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class Accounting:
    """What the accounting found over a run."""

    steps: int = 0
    """Steps checked (every step some member reported)."""
    samples: int = 0
    """Samples whose computing member reported its slice."""
    inferred: int = 0
    """Samples placed in the slices of members that reported none (see the module)."""
    orphaned: int = 0
    """Samples of attempts only a partition's minority applied (see the module)."""
    problems: list[str] = field(default_factory=list)


def account(records: Iterable[dict], global_batch: int, initial: list[str]) -> Accounting:
    """Check every step of the `progress` records in `records` (the timeline's records of
    one run, which also give the views: `agreed` and `installed`); `initial`: the members
    of epoch 0."""
    records = list(records)
    views = _Views(records, initial)
    by_step: dict[int, list[dict]] = defaultdict(list)
    for record in records:
        if record.get("kind") == "progress":
            by_step[int(record["step"])].append(record)
    members_of = {r["decision"]: r["members"] for r in records if r.get("kind") == "agreed"}
    out_at: dict[str, set[int]] = defaultdict(set)
    for record in records:
        if record.get("kind") != "installed" or "step" not in record:
            continue
        worker = record.get("worker", "")
        if record.get("paused") or worker not in members_of.get(record["decision"], [worker]):
            out_at[worker].add(int(record["step"]))
    result = Accounting(steps=len(by_step))
    for step in sorted(by_step):
        found = _check_step(step, by_step[step], global_batch, views, out_at)
        result.samples += found.samples
        result.inferred += found.inferred
        result.orphaned += found.orphaned
        result.problems += found.problems
    return result


def _check_step(
    step: int, reports: list[dict], g: int, views: _Views, out_at: dict[str, set[int]]
) -> Accounting:
    """The accounting of one step from its progress records; `out_at`: worker -> the
    steps at which it stopped training: it installed a paused view (a partition's
    minority) or one that leaves it out (it was removed)."""
    out = Accounting(steps=1)
    seen = Counter(r["worker"] for r in reports)
    out.problems += [
        f"step {step}: {w} reported it {n} times (a duplicated step)"
        for w, n in sorted(seen.items())
        if n > 1
    ]
    attempts: dict[int, dict[str, tuple[int, int]]] = defaultdict(dict)
    sizes: dict[int, set[int]] = defaultdict(set)
    for record in reports:
        if record.get("slice") is not None:
            offset, count = record["slice"]
            attempts[record["epoch"]].setdefault(record["worker"], (int(offset), int(count)))
            sizes[record["epoch"]].add(record["members"])
    if not attempts:
        out.problems.append(f"step {step}: no member reported computing any of its samples")
        return out
    # an attempt whose members all stopped training at the next step was applied only by
    # them (a partition's minority, or a member removed while the total left it): the
    # others redid the step, and the state of those who stopped is replaced when they
    # rejoin
    kept = {
        epoch: slices
        for epoch, slices in attempts.items()
        if not all(step + 1 in out_at.get(w, ()) for w in slices)
    } or attempts
    out.orphaned = sum(c for e in set(attempts) - set(kept) for _, c in attempts[e].values())
    if len(kept) > 1:
        out.problems.append(f"step {step}: computed in epochs {sorted(kept)} (a duplicated step)")
    lagging = {r["worker"] for r in reports if r.get("slice") is None}
    for epoch, slices in sorted(kept.items()):
        size = sizes[epoch].pop() if len(sizes[epoch]) == 1 else None
        members = sorted(set(views.of(epoch, set(slices), size)) | lagging)
        _cover(step, slices, members, g, out)
    return out


def _cover(
    step: int, slices: dict[str, tuple[int, int]], members: list[str], g: int, out: Accounting
) -> None:
    """Walk the slices in sorted member order: they must tile [0, G); a gap is accepted
    (and its samples inferred) only where a member without a known slice sits."""
    position, unknown = 0, False
    for member in members:
        if member not in slices:
            unknown = True  # a member whose slice is not known sits here
            continue
        offset, count = slices[member]
        if offset < position:
            out.problems.append(
                f"step {step}: samples [{offset}, {min(position, offset + count)}) of "
                f"{member} were computed twice (an overlap)"
            )
        elif offset > position and not unknown:
            out.problems.append(f"step {step}: samples [{position}, {offset}) were not computed")
        else:
            out.inferred += offset - position
        out.samples += count
        position = max(position, offset + count)
        unknown = False
    if position > g:
        out.problems.append(f"step {step}: slices reach sample {position}, past G = {g}")
    elif position < g and not unknown:
        out.problems.append(f"step {step}: samples [{position}, {g}) were not computed")
    elif position < g:
        out.inferred += g - position


class _Views:
    """The members of each epoch's view, from the `agreed` records of the decisions
    that were installed (a planned decision replaced by a recovery shares its epoch)."""

    def __init__(self, records: list[dict], initial: list[str]) -> None:
        installed = {r["decision"] for r in records if r.get("kind") == "installed"}
        self._by_epoch: dict[int, list[tuple[bool, list[str]]]] = defaultdict(list)
        self._by_epoch[0].append((True, sorted(initial)))
        for record in records:
            if record.get("kind") == "agreed" and not record.get("paused"):
                entry = (record["decision"] in installed, sorted(record["members"]))
                if entry not in self._by_epoch[record["epoch"]]:
                    self._by_epoch[record["epoch"]].append(entry)

    def of(self, epoch: int, reporters: set[str], size: int | None) -> list[str]:
        """The members of the epoch's view that holds every reporter (and `size`
        members, when known); installed views first; the reporters alone if none does."""
        fits = [
            (not used, members)
            for used, members in self._by_epoch.get(epoch, [])
            if reporters <= set(members) and size in (None, len(members))
        ]
        return min(fits)[1] if fits else sorted(reporters)
