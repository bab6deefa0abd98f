"""how fast leave, link, crash and hang events are decided and training resumes

Runs `chaos run`'s local backend with a schedule that holds every event kind, several
times, and reports medians. Handling time is detection to the decision being agreed by
every member; a crash (SIGKILL) is found by the closed connection, a hang (SIGSTOP) only
by the heartbeat timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics

SCHEDULE = "leave:w5@20,link-down:w0-w2@40,link-up:w0-w2@55,crash:w1@70,hang:w3@95"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=3, help="runs to take medians over")
    parser.add_argument("--workers", type=int, default=6)
    parser.add_argument("--steps", type=int, default=130)
    parser.add_argument("--example", default="digits")
    parser.add_argument("--heartbeat-interval", type=float, default=0.1)
    parser.add_argument("--failure-timeout", type=float, default=1.0)


def run(args: argparse.Namespace) -> dict:
    from chaos_worker.examples import EXAMPLES

    from chaos_cli.local.churn import parse_churn
    from chaos_cli.local.launcher import JobOptions, LocalRun

    samples: dict[str, dict[str, list[float]]] = {}
    step_times: list[float] = []
    for _ in range(args.repeats):
        options = JobOptions(
            entry=EXAMPLES[args.example],
            workers=args.workers,
            steps=args.steps,
            churn=parse_churn(SCHEDULE, args.workers),
            heartbeat_interval_s=args.heartbeat_interval,
            failure_timeout_s=args.failure_timeout,
            example=args.example,
        )
        report = asyncio.run(LocalRun(options).run())
        if report.step_time_s:
            step_times.append(report.step_time_s)
        for event in report.events:
            name = "hang" if "hang" in event.detail or event.worker == "w3" else event.type
            entry = samples.setdefault(name, {})
            entry.setdefault("handling_ms", []).append(event.handling_ms)
            entry.setdefault("incumbent_stall_s", []).append(event.incumbent_stall_s)
            entry.setdefault("steps_lost", []).append(event.steps_lost)
            if event.detail.startswith("detected after"):
                detect, resume = _parse_detail(event.detail)
                entry.setdefault("detect_s", []).append(detect)
                entry.setdefault("resume_s", []).append(resume)
    step_time = statistics.median(step_times) if step_times else None
    events = {
        name: {key: _median(values) for key, values in fields.items()}
        for name, fields in samples.items()
    }
    leave_stall = events.get("leave", {}).get("incumbent_stall_s")
    return {
        "schedule": SCHEDULE,
        "workers": args.workers,
        "repeats": args.repeats,
        "heartbeat_interval_s": args.heartbeat_interval,
        "failure_timeout_s": args.failure_timeout,
        "step_time_s": step_time,
        "events": events,
        "targets": {
            "leave_and_link_handling_ms_max": 20,
            "crash_resume_s_max": 1.5,
            "leave_stall_in_steps": None
            if not (step_time and leave_stall is not None)
            else round(leave_stall / step_time, 3),
        },
    }


def _median(values: list[float]) -> float | None:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return round(statistics.median(finite), 4) if finite else None


def _parse_detail(detail: str) -> tuple[float, float]:
    # "detected after 0.064s, resumed after 0.073s"
    parts = [p.split("after ")[1].rstrip("s") for p in detail.split(", ")]
    return float(parts[0]), float(parts[1])
