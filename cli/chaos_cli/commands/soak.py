"""`chaos soak`: an endurance run proving that a job survives random churn.

Rounds of a three-party job (`--links @three-party`, float64) with random joins, leaves,
crashes, hangs, pauses, link cuts and partitions, each round checked against the
churn-free run (`chaos_cli.local.soak`; docs/soak.md).
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
from pathlib import Path

from chaos_cli.errors import UserError

MAX_WORKERS_PER_PARTY = 10


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "soak",
        help="endurance run: rounds of random churn on a three-party job, each checked",
        description="Run the churn-free job once, then rounds of the same job with a "
        "random churn schedule (joins, leaves, crashes, hangs, pauses, link cuts, "
        "partitions) until --duration is spent. After each round: no lost or duplicated "
        "step, every sample computed once, the churn-free losses to 1e-9, equal final "
        "states, nothing left behind. Exit code 0 when every check passed.",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=180.0,
        metavar="SECONDS",
        help="no new round starts after this (default 180; a 30-minute soak: 1800)",
    )
    parser.add_argument("--seed", type=int, default=0, help="schedule and job seed (default 0)")
    parser.add_argument(
        "--workers-per-party",
        type=int,
        default=2,
        metavar="K",
        help=f"initial workers in each of the 3 parties, 2..{MAX_WORKERS_PER_PARTY} (default 2)",
    )
    parser.add_argument("--example", choices=["digits", "chartransformer"], default="digits")
    parser.add_argument("--failure-timeout", type=float, default=1.0, metavar="SECONDS")
    parser.add_argument(
        "--steps-per-round", type=int, default=400, metavar="N", help="steps a round (default 400)"
    )
    parser.add_argument("--report", default="soak-report.json", help="report JSON path")
    parser.add_argument("--quiet", action="store_true", help="no line per round")
    parser.set_defaults(handler=handle)


def settings_from(args: argparse.Namespace):
    """The soak's settings; UserError on bad input."""
    from chaos_cli.local.soak import SoakSettings
    from chaos_cli.local.soakplan import MIN_STEPS

    if not 0 < args.duration < math.inf:
        raise UserError("--duration must be a positive, finite number of seconds")
    if not 2 <= args.workers_per_party <= MAX_WORKERS_PER_PARTY:
        raise UserError(
            f"--workers-per-party must lie in 2..{MAX_WORKERS_PER_PARTY} (a partition "
            "must leave a majority)"
        )
    if args.steps_per_round < MIN_STEPS:
        raise UserError(f"--steps-per-round must be at least {MIN_STEPS} (room for every event)")
    return SoakSettings(
        duration_s=args.duration,
        seed=args.seed,
        workers_per_party=args.workers_per_party,
        example=args.example,
        failure_timeout_s=args.failure_timeout,
        steps=args.steps_per_round,
        report=Path(args.report),
    )


def job_options(settings, churn: str):
    """The options of one run of the soak's job with `--churn churn`, built and validated
    by `chaos run`'s own option building."""
    from chaos_cli.commands import run

    parser = argparse.ArgumentParser(prog="chaos")
    run.register(parser.add_subparsers())
    argv = ["run", "--quiet", "--churn", churn, "--links", "@three-party", "--dtype", "float64"]
    argv += ["--workers", str(settings.workers), "--steps", str(settings.steps)]
    argv += ["--example", settings.example, "--seed", str(settings.seed)]
    argv += ["--failure-timeout", str(settings.failure_timeout_s)]
    # the run checks that the report's folder is writable; the plot is never drawn
    argv += ["--report", str(settings.report), "--plot", f"{settings.report}.plot.png"]
    return run.options_from(parser.parse_args(argv))


def handle(args: argparse.Namespace) -> int:
    from chaos_cli.commands.run import _interrupt
    from chaos_cli.local.soak import Soak, SoakError

    settings = settings_from(args)
    job_options(settings, "none")  # bad input fails now, before any worker starts
    signal.signal(signal.SIGTERM, _interrupt)  # clean up (processes) as on Ctrl-C
    soak = Soak(
        settings,
        lambda churn: job_options(settings, churn),
        say=(lambda line: None) if args.quiet else lambda line: print(line, flush=True),
    )
    try:
        passed = soak.run()
    except SoakError as exc:
        print(f"chaos soak: {exc}", file=sys.stderr)
        return 1
    finally:
        if soak.rounds:
            soak.write()
    for line in soak.failures():
        print(f"chaos soak: {line}", file=sys.stderr)
    totals = soak.totals()
    if not args.quiet:
        print(
            f"{totals['rounds_passed']} of {totals['rounds']} rounds passed, "
            f"{totals['steps']} steps, {totals['samples_accounted']} samples accounted; "
            f"report {settings.report}"
        )
    return 0 if passed else 1
