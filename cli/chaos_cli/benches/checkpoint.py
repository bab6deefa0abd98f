"""step time with and without checkpoints (same job, runs alternated), and the checkpoint
write times

Each round runs the same churn-free local job twice, once without checkpoints and once
writing one every `--every` steps (the default interval) into a temporary directory, in
alternating order (without first in even rounds), so that a machine getting busier or
quieter weighs on both alike. A step time is the wall time between consecutive steps'
first completion reports; `median_step_s` is the median over every step of every run of
that kind, `ratio` is with / without. `around_checkpoint_step_s` is the median over the two
steps after each due step only (the snapshot copy runs in the first, and the next publish
waits behind it): the worst case, paid once per interval. Runs on a shared machine differ by
more than a checkpoint costs, so `in_run_overhead` also estimates the cost from inside the
runs with checkpoints, where load drift weighs on both sides: what those two steps took
beyond two median steps of the same run, summed over the run and divided by the run's
steps and median step (median over the runs). `copy_s` is the time the snapshot
thread spends copying the slot out, `write_s` the writer thread's encoding, hashing and
writing (with fsync), off the step loop. Timing is never asserted: it is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import shutil
import statistics
import tempfile
from pathlib import Path

from chaos_cli.argtypes import positive_int

EXAMPLES = ("digits", "bigstate")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--example", choices=EXAMPLES, default="digits")
    parser.add_argument(
        "--state-mb", type=float, default=16.0, help="bigstate: frozen table size (default 16)"
    )
    parser.add_argument("--workers", type=positive_int, default=3, help="default 3")
    parser.add_argument("--steps", type=positive_int, default=300, help="per run (default 300)")
    parser.add_argument("--every", type=positive_int, default=100, help="interval (default 100)")
    parser.add_argument("--rounds", type=positive_int, default=2, help="pairs of runs (2)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--global-batch", type=positive_int, default=64)


def _run(args: argparse.Namespace, folder: Path | None) -> tuple[dict[int, float], list[dict]]:
    """One job: step completion times, and the checkpoint records (with `folder`)."""
    from chaos_worker.examples import EXAMPLES as ENTRIES

    from chaos_cli.local.launcher import JobOptions, LocalRun

    options = JobOptions(
        entry=ENTRIES[args.example],
        workers=args.workers,
        steps=args.steps,
        global_batch=args.global_batch,
        dtype=args.dtype,
        example=args.example,
        checkpoint_dir=None if folder is None else str(folder),
        checkpoint_every_steps=args.every,
    )
    job = LocalRun(options)
    report = asyncio.run(job.run())
    if report.problems or report.steps != args.steps:
        raise SystemExit(f"bench checkpoint: the run failed: {report.problems}")
    return job.timeline.step_times(), job.timeline.of("checkpoint")


def _gaps(times: dict[int, float]) -> dict[int, float]:
    steps = sorted(times)
    return {b: times[b] - times[a] for a, b in itertools.pairwise(steps)}


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 6) if values else None


def run(args: argparse.Namespace) -> dict:
    if args.example == "bigstate":
        os.environ["CHAOS_STATE_MB"] = str(args.state_mb)  # the workers inherit it
    gaps: dict[str, list[float]] = {"without": [], "with": []}
    around: list[float] = []
    overheads: list[float] = []
    records: list[dict] = []
    rounds = []
    for index in range(args.rounds):
        order = ("without", "with") if index % 2 == 0 else ("with", "without")
        medians = {}
        for kind in order:
            folder = Path(tempfile.mkdtemp(prefix="chaos-bench-ckpt-")) if kind == "with" else None
            try:
                times, written = _run(args, folder)
            finally:
                if folder is not None:
                    shutil.rmtree(folder, ignore_errors=True)
            step_gaps = _gaps(times)
            gaps[kind] += step_gaps.values()
            medians[kind] = _median(list(step_gaps.values()))
            if kind == "with":
                records += written
                due = {r["step"] for r in written if not r["final"]}
                near = [g for s, g in step_gaps.items() if s in due or s - 1 in due]
                around += near
                typical = statistics.median(step_gaps.values())
                excess = sum(near) - len(near) * typical
                overheads.append(excess / (len(step_gaps) * typical))
        rounds.append({"order": list(order), "median_step_s": medians})
    without, with_ = _median(gaps["without"]), _median(gaps["with"])
    periodic = [r for r in records if not r["final"]]
    return {
        "job": {
            "example": args.example,
            "state_mb": args.state_mb if args.example == "bigstate" else None,
            "workers": args.workers,
            "steps": args.steps,
            "dtype": args.dtype,
            "global_batch": args.global_batch,
        },
        "every_steps": args.every,
        "median_step_s": {"without": without, "with": with_},
        "ratio": round(with_ / without, 4) if with_ and without else None,
        "around_checkpoint_step_s": _median(around),
        "in_run_overhead": _median(overheads),
        "checkpoints": {
            "count": len(records),
            "bytes": records[0]["bytes"] if records else None,
            "median_copy_s": _median([r["copy_s"] for r in periodic]),
            "median_write_s": _median([r["write_s"] for r in periodic]),
            "max_write_s": max((round(r["write_s"], 6) for r in records), default=None),
            "final_write_s": next((round(r["write_s"], 6) for r in records if r["final"]), None),
        },
        "rounds": rounds,
    }
