"""Turn the records workers send to the launcher into the run report (pure functions).

Workers stamp records with `time.monotonic()`, which on Linux is one clock for every
process of the machine, so times from different workers can be compared directly.
"""

from __future__ import annotations

import itertools
import statistics
from dataclasses import dataclass, field

from chaos_worker.telemetry.stall import lost_time

from chaos_cli.local.churn import ChurnEvent
from chaos_cli.local.report import RunEvent

TYPE_OF = {
    "leave": "leave",
    "crash": "crash",
    "hang": "crash",
    "pause": "pause",
    "link-down": "link_down",
    "link-up": "link_up",
    "join": "join",
}
PROPOSAL_KIND = {"leave": "leave", "link-down": "link_down", "link-up": "link_up"}


@dataclass
class Fired:
    """A churn event as the launcher injected it."""

    event: ChurnEvent
    at: float
    step: int


@dataclass
class Timeline:
    """Everything the launcher heard, in arrival order."""

    records: list[dict] = field(default_factory=list)
    fired: list[Fired] = field(default_factory=list)

    def add(self, record: dict) -> None:
        self.records.append(record)

    def of(self, kind: str) -> list[dict]:
        return [r for r in self.records if r.get("kind") == kind]

    def loss_curve(self) -> list[tuple[int, float]]:
        """Loss of every completed step (first report wins; members agree exactly)."""
        curve: dict[int, float] = {}
        for record in self.of("progress"):
            curve.setdefault(int(record["step"]), float(record["loss"]))
        return sorted(curve.items())

    def step_times(self) -> dict[int, float]:
        """When each step was first reported complete."""
        times: dict[int, float] = {}
        for record in self.of("progress"):
            times.setdefault(int(record["step"]), float(record["t"]))
        return times

    def members_curve(self) -> list[tuple[int, int]]:
        members: dict[int, int] = {}
        for record in self.of("progress"):
            members.setdefault(int(record["step"]), int(record["members"]))
        return sorted(members.items())

    def events(self) -> list[RunEvent]:
        return [self._event(f) for f in self.fired]

    def _event(self, fired: Fired) -> RunEvent:
        kind = fired.event.kind
        detected = self._detected(fired)
        decision = self._decision_for(fired, detected)
        agreed = [r["t"] for r in self.of("agreed") if decision and r["decision"] == decision]
        handling_ms = (max(agreed) - detected) * 1e3 if agreed and detected else float("nan")
        stall = self._stall_after(fired.at)
        delay = slowdown = None
        detail = ""
        if kind == "join":
            delay, detail = self._join_delay(fired.event.worker)
            if delay is not None:  # the whole join, from the request to the first shared steps
                slowdown = self._stall_after(fired.at, until=fired.at + delay)
                stall = self._waited_for(fired.event.worker)
        if kind in ("crash", "hang"):
            resumed = self._first_progress_after(max(agreed) if agreed else fired.at)
            if resumed is not None:
                detail = (
                    f"detected after {detected - fired.at:.3f}s, "
                    f"resumed after {resumed - fired.at:.3f}s"
                    if detected is not None
                    else "not detected (the worker had already left)"
                )
        if kind == "pause":
            detail = self._pause_detail(fired)
        if kind == "link-down" and self._paused_after(fired.at):
            detail = "partition: minority side paused"
        return RunEvent(
            type=TYPE_OF[kind],
            worker=fired.event.worker
            if not fired.event.peer
            else f"{fired.event.worker}-{fired.event.peer}",
            step=fired.step,
            handling_ms=round(handling_ms, 3),
            incumbent_stall_s=round(stall, 4),
            steps_lost=self.steps_lost(),
            scale_out_delay_s=None if delay is None else round(delay, 4),
            incumbent_slowdown_s=None if slowdown is None else round(slowdown, 4),
            detail=detail,
        )

    def _detected(self, fired: Fired) -> float | None:
        kind = fired.event.kind
        if kind in ("crash", "hang", "pause"):
            times = [
                r["t"]
                for r in self.of("detected")
                if r.get("subject") == fired.event.worker and r["t"] >= fired.at - 1e-3
            ]
            return min(times) if times else None
        if kind == "join":
            times = [r["t"] for r in self.of("join_requested") if r["worker"] == fired.event.worker]
            return min(times) if times else None
        times = [
            r["t"]
            for r in self.of("detected")
            if r.get("event") == PROPOSAL_KIND[kind] and r.get("subject") == fired.event.worker
        ] + [
            r["t"]
            for r in self.of("detected")
            if r.get("event") == PROPOSAL_KIND[kind] and r.get("subject") == fired.event.peer
        ]
        times = [t for t in times if t >= fired.at - 1e-3]
        return min(times) if times else None

    def _decision_for(self, fired: Fired, detected: float | None) -> str | None:
        """The first decision agreed after the event was detected."""
        if detected is None:
            return None
        later = [r for r in self.of("agreed") if r["t"] >= detected]
        if fired.event.kind == "join":
            later = [r for r in later if fired.event.worker in r.get("members", [])]
        return later[0]["decision"] if later else None

    def _pause_detail(self, fired: Fired) -> str:
        """When the paused worker was removed from the view and when it was back in one."""
        worker = fired.event.worker
        views = [r for r in self._views_in_force() if r["t"] >= fired.at]
        out = next((r for r in views if worker not in r["members"]), None)
        if out is None:
            return "not removed"
        back = next(
            (r for r in views if r["epoch"] > out["epoch"] and worker in r["members"]), None
        )
        removed = f"removed at step {out['effective_step']}"
        if back is None:
            return f"{removed}, did not rejoin"
        return f"{removed}, rejoined at step {back['effective_step']}"

    def _first_progress_after(self, t: float) -> float | None:
        times = [r["t"] for r in self.of("progress") if r["t"] > t]
        return min(times) if times else None

    def _paused_after(self, t: float) -> bool:
        return any(r.get("t", t) >= t for r in self.of("paused"))

    def _join_delay(self, worker: str) -> tuple[float | None, str]:
        requested = [r["t"] for r in self.of("join_requested") if r["worker"] == worker]
        # the newcomer starts its first contributing step when it installs the join's view
        first = [r["t"] for r in self.of("joined") if r["worker"] == worker] or [
            r["t"] for r in self.of("progress") if r["worker"] == worker
        ]
        if not requested or not first:
            return None, "join did not complete"
        return min(first) - min(requested), self._join_detail(worker)

    def _waited_for(self, worker: str, window: int = 3) -> float:
        """Idle time a join cost the incumbents (PAPERS.md A.7.3, blocked in the all-reduce):
        over the newcomer's first `window` steps, how long its gradient was ready after the
        last incumbent's, which is how long they waited for it. Steps before it took part
        cannot wait for it; that they ran slower meanwhile is `_stall_after`'s slowdown."""
        ready: dict[int, dict[str, float]] = {}
        for record in self.of("progress"):
            if "ready_t" in record:
                ready.setdefault(int(record["step"]), {})[record["worker"]] = record["ready_t"]
        first = sorted(s for s, by in ready.items() if worker in by)[:window]
        waited = 0.0
        for step in first:
            others = [t for member, t in ready[step].items() if member != worker]
            if others:
                waited += max(0.0, ready[step][worker] - max(others))
        return waited

    def joins(self) -> list[dict]:
        """What each completed join did: its path and, for a pull, what came from where."""
        out = []
        for joined in self.of("joined"):
            worker = joined["worker"]
            pulled = next((r for r in self.of("state_loaded") if r["worker"] == worker), {})
            keep = (
                "step",
                "bytes_per_source",
                "replans",
                "rejected",
                "pull_s",
                "strategy",
                "bandwidths",
                "figures",
            )
            out.append(
                {"worker": worker, "path": joined["path"]}
                | {k: pulled[k] for k in keep if k in pulled}
            )
        return out

    def _join_detail(self, worker: str) -> str:
        """Which path a join took and, for a multi-source pull, the bytes per source."""
        joined = [r for r in self.of("joined") if r["worker"] == worker]
        if not joined or joined[0].get("path") != "observer":
            return "stop-and-copy: full state from one member at the switch step"
        loaded = [r for r in self.of("state_loaded") if r["worker"] == worker]
        if not loaded:
            return "observer"
        pulled = loaded[0]
        sources = ", ".join(
            f"{m} {_size(n)}" for m, n in sorted(pulled["bytes_per_source"].items())
        )
        return (
            f"observer: pulled snapshot {pulled['step']} in {pulled['pull_s']:.3f}s "
            f"({pulled['strategy']}: {sources}), replayed to the switch step"
        )

    def step_gaps(self) -> list[float]:
        """Wall time between consecutive completed steps."""
        return list(self._gaps().values())

    def _gaps(self) -> dict[int, float]:
        times = self.step_times()
        return {s: times[s] - times[p] for p, s in itertools.pairwise(sorted(times))}

    def _stall_after(self, t: float, window: int = 3, until: float | None = None) -> float:
        """Time lost by the incumbents after `t`: the steps finished by `until` (if given)
        and `window` more, minus as many median steps (at least 0). Fast and slow steps
        cancel out, so jitter alone does not add up to a stall."""
        times = self.step_times()
        steps = sorted(times)
        gaps = self._gaps()
        if not gaps:
            return 0.0
        typical = statistics.median(gaps.values())
        later = [s for s in steps if times[s] >= t and s in gaps]
        during = [s for s in later if until is not None and times[s] <= until]
        after = later[: len(during) + window]
        return lost_time([gaps[s] for s in after], typical)

    def membership_changes(self, initial: list[str]) -> list[dict]:
        """Every change of the members in force, injected or not: for each installed view
        that differs from the one before it (the first: `initial`), its epoch, effective
        step, who came and went, and the proposals behind it (`kind:subject`)."""
        changes, before = [], set(initial)
        for record in self._views_in_force():
            members = set(record["members"])
            if members != before:
                changes.append(
                    {
                        "epoch": record["epoch"],
                        "step": record["effective_step"],
                        "added": sorted(members - before),
                        "removed": sorted(before - members),
                        "members": sorted(members),
                        "causes": record.get("causes", []),
                    }
                )
            before = members
        return changes

    def _views_in_force(self) -> list[dict]:
        """The `agreed` record (first report) of every decision some member installed
        as a training view (not paused), in epoch order; a planned decision that a
        recovery replaced before its step was agreed but never installed."""
        agreed: dict[str, dict] = {}
        for record in self.of("agreed"):
            agreed.setdefault(record["decision"], record)
        installed = {r["decision"] for r in self.of("installed") if not r.get("paused")}
        return sorted(
            (agreed[d] for d in installed if d in agreed),
            key=lambda r: (r["epoch"], r["effective_step"]),
        )

    def steps_lost(self) -> int:
        """Steps between the first and last completed step that never completed."""
        steps = [s for s, _ in self.loss_curve()]
        return (steps[-1] - steps[0] + 1 - len(steps)) if steps else 0


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e6:.1f} MB" if nbytes >= 1e5 else f"{nbytes / 1e3:.1f} kB"
