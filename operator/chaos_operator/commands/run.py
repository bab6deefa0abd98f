"""`chaos run`: the main job — N workers on loopback training a bundled example with churn."""

from __future__ import annotations

import argparse
import asyncio
import math
import signal
import sys
from pathlib import Path

from chaos_operator.errors import UserError

DEFAULT_EXAMPLE = "digits"


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "run",
        help="train a bundled example with N local workers and injected churn",
        description="Start N workers on loopback, inject a churn schedule, show live "
        "progress, and write a JSON report and a PNG plot.",
    )
    parser.add_argument("--workers", type=int, default=4, help="initial workers (default 4)")
    parser.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    parser.add_argument(
        "--example", default=DEFAULT_EXAMPLE, help="bundled example: digits or chartransformer"
    )
    parser.add_argument("--entry", help="module:factory of your own job (overrides --example)")
    parser.add_argument(
        "--churn",
        default="default",
        help="schedule such as 'leave:w2@40,crash:w1@80,link-down:w0-w3@100,"
        "link-up:w0-w3@120,join@150' (numbers are steps); 'none' turns churn off; "
        "'default' scales that schedule to --steps",
    )
    parser.add_argument("--global-batch", type=int, default=64, help="samples per step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--base-port", type=int, default=0, help="first port (default: any)")
    parser.add_argument("--heartbeat-interval", type=float, default=0.1, metavar="SECONDS")
    parser.add_argument("--failure-timeout", type=float, default=1.0, metavar="SECONDS")
    parser.add_argument("--report", default="chaos-report.json", help="report JSON path")
    parser.add_argument("--plot", help="PNG path (default: the report path with .png)")
    parser.add_argument("--quiet", action="store_true", help="no live view")
    parser.add_argument(
        "--metrics", action="store_true", help="workers serve Prometheus /metrics (ports: report)"
    )
    parser.add_argument(
        "--links",
        default="",
        help="emulated WAN links: 'w0-w3=20MB/s+40ms,*=100MB/s' (rate per direction, "
        "added one-way delay; default: unshaped) or a bundled profile: @three-party",
    )
    parser.add_argument(
        "--netns",
        action="store_true",
        help="every worker in its own network namespace, link rates shaped by tc (needs "
        "root; otherwise falls back to in-process shaping)",
    )
    parser.add_argument(
        "--downlink",
        action="append",
        default=[],
        metavar="WORKER=RATE",
        help="shape a worker's downlink, e.g. w4=50MB/s (repeatable)",
    )
    parser.add_argument(
        "--join-mode",
        choices=["observe", "copy"],
        default="observe",
        help="observe: multi-source snapshot pull while replaying gradients (default); "
        "copy: stop-and-copy of the full state from one member",
    )
    parser.add_argument(
        "--join-strategy",
        choices=["greedy", "single", "equal", "proportional"],
        default="greedy",
        help="shard plan for joins: greedy (planned, default) or a baseline",
    )
    parser.set_defaults(handler=handle)


def _downlinks(items: list[str]) -> dict[str, float]:
    from chaos_worker.shaping import ShapeError, parse_rate

    out = {}
    for item in items:
        worker, eq, rate = item.partition("=")
        if not eq or not worker:
            raise UserError(f"--downlink {item!r} is not WORKER=RATE, e.g. w4=50MB/s")
        try:
            out[worker] = parse_rate(rate)
        except ShapeError as exc:
            raise UserError(f"--downlink: {exc}") from None
    return out


def options_from(args: argparse.Namespace):
    """Validate the command line into launcher options (UserError on bad input)."""
    from chaos_worker.churn import ChurnError, default_churn, parse_churn
    from chaos_worker.examples import EXAMPLES
    from chaos_worker.launcher import JobOptions, worker_names

    if args.workers < 1:
        raise UserError("--workers must be at least 1")
    if args.steps < 1:
        raise UserError("--steps must be at least 1")
    if args.global_batch < 1:
        raise UserError("--global-batch must be at least 1")
    if not 0 < args.heartbeat_interval < args.failure_timeout:
        raise UserError("need 0 < --heartbeat-interval < --failure-timeout")
    if not 0 <= args.base_port <= 65535 - args.workers:
        raise UserError("--base-port must be a port number")
    entry = args.entry or EXAMPLES.get(args.example)
    if entry is None:
        raise UserError(f"--example {args.example!r} unknown; choose from {sorted(EXAMPLES)}")
    spec = default_churn(args.workers, args.steps) if args.churn == "default" else args.churn
    try:
        churn = parse_churn(spec, args.workers)
    except ChurnError as exc:
        raise UserError(str(exc)) from None
    if any(e.step >= args.steps for e in churn):
        raise UserError(f"--churn: every event must come before the last step ({args.steps})")
    from chaos_worker.profiles import resolve_links
    from chaos_worker.shaping import ShapeError, parse_links

    try:
        links = resolve_links(args.links, worker_names(args.workers, churn))
        parse_links(links)
    except ShapeError as exc:
        raise UserError(str(exc)) from None
    return JobOptions(
        entry=entry,
        workers=args.workers,
        steps=args.steps,
        global_batch=args.global_batch,
        seed=args.seed,
        dtype=args.dtype,
        device=args.device,
        churn=churn,
        base_port=args.base_port,
        heartbeat_interval_s=args.heartbeat_interval,
        failure_timeout_s=args.failure_timeout,
        example=args.entry or args.example,
        metrics=args.metrics,
        links=links,
        downlinks=_downlinks(args.downlink),
        join_mode=args.join_mode,
        join_strategy=args.join_strategy,
        netns=args.netns,
    )


def check_entry(options) -> None:
    """Load the job once here so that a broken factory fails before any worker starts."""
    import torch
    from chaos_worker.process import pick_device
    from chaos_worker.trainspec import FactoryError, load_trainspec

    try:
        load_trainspec(
            options.entry,
            seed=options.seed,
            dtype=getattr(torch, options.dtype),
            device=pick_device(options.device),
        )
    except FactoryError as exc:
        raise UserError(str(exc)) from None


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def handle(args: argparse.Namespace) -> int:
    from chaos_worker.launcher import LaunchError, LocalJob
    from chaos_worker.report import plot_report, write_report

    from chaos_operator.live import LiveView

    options = options_from(args)
    check_entry(options)
    if options.netns:
        from chaos_worker.netns import unavailable_reason

        if why := unavailable_reason():
            print(
                f"chaos run: --netns unavailable ({why}); shaping links in-process", file=sys.stderr
            )
            options.netns = False
    signal.signal(signal.SIGTERM, _interrupt)  # clean up (processes, namespaces) as on Ctrl-C
    live = LiveView(options, enabled=not args.quiet)
    job = LocalJob(options, on_update=live.update)
    try:
        with live:
            report = asyncio.run(job.run())
    except LaunchError as exc:
        raise UserError(str(exc)) from None
    report_path = Path(args.report)
    plot_path = Path(args.plot) if args.plot else report_path.with_suffix(".png")
    write_report(report, report_path)
    plot_report(report, plot_path)
    live.summary(report, report_path, plot_path)
    if report.steps < options.steps or math.isnan(report.final_loss):
        print(f"chaos run: only {report.steps} of {options.steps} steps completed", file=sys.stderr)
        return 1
    return 0
