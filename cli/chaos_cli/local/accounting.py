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
"""

from __future__ import annotations

from collections import defaultdict
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
    result = Accounting(steps=len(by_step))
    for step in sorted(by_step):
        found = _check_step(step, by_step[step], global_batch, views)
        result.samples += found.samples
        result.inferred += found.inferred
        result.problems += found.problems
    return result


def _check_step(step: int, reports: list[dict], g: int, views: _Views) -> Accounting:
    """The accounting of one step from its progress records."""
    out = Accounting(steps=1)
    seen: dict[str, int] = defaultdict(int)
    for record in reports:
        seen[record["worker"]] += 1
    out.problems += [
        f"step {step}: {w} reported it {n} times (a duplicated step)"
        for w, n in sorted(seen.items())
        if n > 1
    ]
    slices: dict[str, tuple[int, int]] = {}
    for record in reports:
        if record.get("slice") is not None:
            offset, count = record["slice"]
            slices.setdefault(record["worker"], (int(offset), int(count)))
    if not slices:
        out.problems.append(f"step {step}: no member reported computing any of its samples")
        return out
    epochs = sorted({r["epoch"] for r in reports if r.get("slice") is not None})
    if len(epochs) > 1:
        out.problems.append(f"step {step}: computed in epochs {epochs} (a duplicated step)")
    sizes = {r["members"] for r in reports if r.get("slice") is not None}
    members = views.of(epochs[0], set(slices), sizes.pop() if len(sizes) == 1 else None)
    members = sorted(set(members) | set(seen))
    position, unknown, covered = 0, False, 0
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
        covered += count
        position = max(position, offset + count)
        unknown = False
    if position > g:
        out.problems.append(f"step {step}: slices reach sample {position}, past G = {g}")
    elif position < g and not unknown:
        out.problems.append(f"step {step}: samples [{position}, {g}) were not computed")
    elif position < g:
        out.inferred += g - position
    out.samples = covered
    return out


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
