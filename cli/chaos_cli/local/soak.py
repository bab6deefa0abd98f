"""`chaos soak`: rounds of random churn on a three-party job, every round checked.

A soak runs the churn-free reference job once, then rounds until its duration is spent:
each round is one local run (`LocalRun`) of the same job with a random schedule of every
kind of churn (`soakplan.draw_schedule`), after which it checks

- `steps`: every step of the round completed (`loss_curve` steps are `range(N)`);
- `samples`: every sample of every step computed exactly once, no step applied twice
  (`accounting.account` over the round's progress records);
- `losses`: the loss of every step equals the reference's to a relative 1e-9;
- `verdict`: the run's own problems (`verdict.py`): equal final states, nobody removed
  without an event that explains it, no member the run did not start;
- `leaks`: no process, listening address or `/dev/shm` snapshot directory of the round
  left behind (`leaks.py`).

The result of every round and the totals go to a JSON report, rewritten after each round.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from chaos_cli.local.accounting import account
from chaos_cli.local.launcher import JobOptions, LaunchError, LocalRun
from chaos_cli.local.leaks import Watch, leftovers, shm_entries
from chaos_cli.local.report import Report
from chaos_cli.local.soakplan import Schedule, draw_schedule

REL_TOL = 1e-9
"""Losses of a round and of the reference agree to this relative difference (float64)."""
ROUND_TIMEOUT_FACTOR = 5.0
ROUND_TIMEOUT_MIN_S = 300.0
"""A round may take this many times the reference run's wall time (at least the
minimum) before it counts as stalled and is stopped."""
STALL_S = 60.0
"""A round in which no new step completes for this long is stalled and stopped (a pause
lasts 2.5 failure timeouts; a rejoin some seconds)."""


class SoakError(Exception):
    """The soak could not run at all (e.g. the reference run failed)."""


class Stalled(Exception):
    """No step completed for `STALL_S` in a round."""


@dataclass
class _Progress:
    """Watches a round while it runs: its replicators (leaks) and whether it stalls."""

    watch: Watch = field(default_factory=Watch)
    step: int = -1
    since: float = field(default_factory=time.monotonic)

    def __call__(self, run: LocalRun) -> None:
        self.watch.tick({p.popen.pid for p in run.procs.values()})
        now = time.monotonic()
        if run.max_step != self.step:
            self.step, self.since = run.max_step, now
        elif self.step >= 0 and now - self.since > STALL_S:
            raise Stalled(
                f"stalled: no step completed for {STALL_S:g} s after step {self.step}; "
                f"views in force: {views_in_force(run.timeline.records)}"
            )


def views_in_force(records: list[dict]) -> str:
    """Each member's last installed view, e.g. `w0 e10, w1 e9, w2 e5 paused`: members in
    different epochs at one step, or a job with every side paused, explain a stall."""
    last: dict[str, dict] = {}
    for record in records:
        if record.get("kind") == "installed":
            last[record["worker"]] = record
    return (
        ", ".join(
            f"{w} e{r['epoch']}" + (" paused" if r.get("paused") else "")
            for w, r in sorted(last.items())
        )
        or "none installed"
    )


@dataclass
class SoakSettings:
    """What `chaos soak` was asked for (its options, validated)."""

    duration_s: float = 180.0
    seed: int = 0
    workers_per_party: int = 2
    example: str = "digits"
    failure_timeout_s: float = 1.0
    steps: int = 400
    report: Path = Path("soak-report.json")

    @property
    def workers(self) -> int:
        return 3 * self.workers_per_party


@dataclass
class Round:
    """One round: its schedule, what happened, the checks and their findings."""

    index: int
    schedule: Schedule
    wall_s: float = 0.0
    steps: int = 0
    samples: int = 0
    inferred: int = 0
    orphaned: int = 0
    events: list[dict] = field(default_factory=list)
    checks: dict[str, dict] = field(default_factory=dict)
    records: str = ""
    """A failed round's records, kept for a diagnosis (`Soak._keep_records`)."""

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c["ok"] for c in self.checks.values())

    def failed(self) -> list[str]:
        return [name for name, check in self.checks.items() if not check["ok"]]

    def as_dict(self) -> dict:
        return {
            "round": self.index,
            "schedule": self.schedule.spec,
            "episodes": dict(sorted(self.schedule.episodes.items())),
            "events": self.events,
            "steps": self.steps,
            "samples_accounted": self.samples,
            "samples_inferred": self.inferred,
            "samples_orphaned": self.orphaned,
            "checks": self.checks,
            "passed": self.passed,
            "wall_s": round(self.wall_s, 2),
        } | ({"records": self.records} if self.records else {})


def check(problems: list[str], **details) -> dict:
    """A check's record: ok when nothing was found."""
    return {"ok": not problems, "problems": problems, **details}


def loss_mismatches(
    curve: list[tuple[int, float]], reference: dict[int, float], rel: float = REL_TOL
) -> list[str]:
    """Steps whose loss differs from the reference's by more than `rel` (relative)."""
    found = []
    for step, loss in curve:
        want = reference.get(step)
        if want is None:
            found.append(f"step {step}: the reference has no such step")
        elif not abs(loss - want) <= rel * max(abs(loss), abs(want)):
            found.append(f"step {step}: loss {loss!r}, the reference's {want!r}")
    return found


class Soak:
    """The soak: `job_options(churn)` gives the options of a run with that `--churn`
    (the reference's is `none`), validated as `chaos run` validates them."""

    def __init__(
        self,
        settings: SoakSettings,
        job_options: Callable[[str], JobOptions],
        say: Callable[[str], None] = print,
    ) -> None:
        self.settings = settings
        self.job_options = job_options
        self.say = say
        self.rounds: list[Round] = []
        self.reference: dict[int, float] = {}
        self.reference_wall_s = 0.0
        self.started = time.monotonic()

    def run(self) -> bool:
        """The reference, then rounds until the duration is spent; True if every check of
        every round passed. The report is written after each round."""
        self._reference()
        while not self.rounds or time.monotonic() - self.started < self.settings.duration_s:
            result = self.run_round(len(self.rounds))
            self.rounds.append(result)
            self.write()
            self.say(self.line(result))
        return all(r.passed for r in self.rounds)

    def _reference(self) -> None:
        started = time.monotonic()
        try:
            report = asyncio.run(LocalRun(self.job_options("none")).run())
        except LaunchError as exc:
            raise SoakError(f"the churn-free reference run failed: {exc}") from None
        self.reference_wall_s = time.monotonic() - started
        steps = [s for s, _ in report.loss_curve]
        if steps != list(range(self.settings.steps)) or report.problems:
            why = "; ".join(report.problems) or f"{len(steps)} of {self.settings.steps} steps"
            raise SoakError(f"the churn-free reference run failed: {why}")
        self.reference = dict(report.loss_curve)
        self.say(
            f"reference: {len(steps)} steps, final loss {report.final_loss:.6g} "
            f"({self.reference_wall_s:.1f} s)"
        )

    def run_round(self, index: int) -> Round:
        """One round: draw its schedule, run it, check it."""
        s = self.settings
        schedule = draw_schedule(s.seed, index, s.workers, s.steps)
        result = Round(index, schedule)
        shm_before = shm_entries()
        watching = _Progress()
        runner = LocalRun(self.job_options(schedule.spec), on_update=watching)
        started = time.monotonic()
        report, error = None, ""
        limit = max(ROUND_TIMEOUT_MIN_S, ROUND_TIMEOUT_FACTOR * self.reference_wall_s)
        try:
            report = asyncio.run(asyncio.wait_for(runner.run(), limit))
        except LaunchError as exc:
            error = f"the run failed: {exc}"
        except Stalled as exc:
            error = str(exc)
        except TimeoutError:
            error = f"stopped after {limit:.0f} s at step {runner.max_step}"
        result.wall_s = time.monotonic() - started
        if error:
            result.checks["run"] = check([error])
        self._check(result, runner, report)
        workers = {p.popen.pid: name for name, p in runner.procs.items()}
        addresses = {name: p.address for name, p in runner.procs.items() if p.address}
        found, details = leftovers(
            str(runner.run_dir), workers, addresses, watching.watch, shm_before
        )
        result.checks["leaks"] = check(found, **details)
        if not result.passed:
            result.records = self._keep_records(index, runner)
        return result

    def _keep_records(self, index: int, runner: LocalRun) -> str:
        """Write what the launcher heard in a failed round (every record, then the churn
        as injected), one JSON object a line, next to the report; returns the path."""
        report = self.settings.report
        path = report.with_name(f"{report.stem}.round-{index}.jsonl")
        with path.open("w", encoding="utf-8") as out:
            for record in runner.timeline.records:
                out.write(json.dumps(record) + "\n")
            for fired in runner.timeline.fired:
                entry = {"kind": "fired", "event": fired.event.label, "t": fired.at}
                out.write(json.dumps(entry | {"step": fired.step}) + "\n")
        return str(path)

    def _check(self, result: Round, runner: LocalRun, report: Report | None) -> None:
        """The checks that read the run: steps, samples, losses, verdict."""
        s = self.settings
        curve = runner.timeline.loss_curve()
        result.steps = len(curve)
        missing = sorted(set(range(s.steps)) - {step for step, _ in curve})
        extra = [step for step, _ in curve if not 0 <= step < s.steps]
        result.checks["steps"] = check(
            [f"step {m} never completed" for m in missing[:10]]
            + [f"step {e} is not a step of the job" for e in extra[:10]],
            completed=len(curve),
            missing=len(missing),
        )
        found = account(runner.timeline.records, runner.opts.global_batch, runner.initial_members())
        result.samples, result.inferred, result.orphaned = (
            found.samples,
            found.inferred,
            found.orphaned,
        )
        result.checks["samples"] = check(
            found.problems[:20],
            steps=found.steps,
            accounted=found.samples,
            inferred=found.inferred,
            orphaned=found.orphaned,
            problems_total=len(found.problems),
        )
        wrong = loss_mismatches(curve, self.reference)
        result.checks["losses"] = check(wrong[:10], compared=len(curve), differing=len(wrong))
        events = report.events if report else runner.timeline.events()
        result.events = [
            {"type": e.type, "worker": e.worker, "step": e.step, "detail": e.detail}
            for e in events
            if e.type != "link_up"
        ]
        if report is None:
            return  # the `run` check says why
        problems = list(report.problems)
        if math.isnan(report.final_loss):
            problems.append("the final loss is not a number")
        result.checks["verdict"] = check(problems)

    def line(self, result: Round) -> str:
        """One line about a finished round."""
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(result.schedule.episodes.items()))
        verdict = "checks ok" if result.passed else f"FAILED: {', '.join(result.failed())}"
        return (
            f"round {result.index}: {result.steps} steps, {kinds}; {verdict} "
            f"({result.wall_s:.1f} s)"
        )

    def failures(self) -> list[str]:
        """One line per failed check of every round: its first problem."""
        lines = []
        for result in self.rounds:
            for name in result.failed():
                problems = result.checks[name]["problems"]
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                lines.append(f"round {result.index} {name}: {problems[0]}{more}")
        return lines

    def totals(self) -> dict:
        """Sums over the rounds."""
        episodes: Counter = Counter()
        for result in self.rounds:
            episodes.update(result.schedule.episodes)
        return {
            "rounds": len(self.rounds),
            "rounds_passed": sum(r.passed for r in self.rounds),
            "steps": sum(r.steps for r in self.rounds),
            "samples_accounted": sum(r.samples for r in self.rounds),
            "samples_inferred": sum(r.inferred for r in self.rounds),
            "samples_orphaned": sum(r.orphaned for r in self.rounds),
            "events": dict(sorted(episodes.items())),
            "failed_checks": self.failures(),
            "wall_s": round(time.monotonic() - self.started, 1),
        }

    def write(self) -> Path:
        """Write the JSON report (settings, reference, rounds, totals)."""
        s = self.settings
        body = {
            "settings": {
                "duration_s": s.duration_s,
                "seed": s.seed,
                "workers_per_party": s.workers_per_party,
                "workers": s.workers,
                "example": s.example,
                "failure_timeout_s": s.failure_timeout_s,
                "steps_per_round": s.steps,
                "links": "@three-party",
                "dtype": "float64",
            },
            "reference": {
                "steps": len(self.reference),
                "final_loss": self.reference.get(s.steps - 1),
                "wall_s": round(self.reference_wall_s, 2),
            },
            "rounds": [r.as_dict() for r in self.rounds],
            "totals": self.totals(),
            "passed": bool(self.rounds) and all(r.passed for r in self.rounds),
        }
        s.report.write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
        return s.report
