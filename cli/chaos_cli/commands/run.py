"""`chaos run [FILE]`: the main job — local workers training with injected churn.

Without FILE: N workers on loopback train a bundled example. With a ChaosJob manifest:
the operator's reconcile drives local processes (`chaos_cli.local.reconciled`).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import sys
import tempfile
from pathlib import Path

from chaos_cli.argtypes import mebibytes, positive_int
from chaos_cli.errors import RunFailed, UserError

DEFAULT_EXAMPLE = "digits"
MAX_GLOBAL_BATCH = 1 << 24
MAX_SPARES = 16
"""The most samples per step: float32 gradients count their samples exactly up to 2**24."""
DEFAULT_LOAD_TIMEOUT_S = 120.0
"""How long `--load-timeout` gives the entry: importing torch, its module, one factory call."""


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "run",
        help="train locally with injected churn: a bundled example or a ChaosJob manifest",
        description="Start workers on loopback, inject a churn schedule, show live "
        "progress, and write a JSON report and a PNG plot. With FILE, the workers are the "
        "pods the operator's reconcile makes of that ChaosJob, run as local processes.",
    )
    parser.add_argument(
        "manifest",
        nargs="?",
        metavar="FILE",
        help="a ChaosJob manifest (YAML) to run locally, e.g. examples/chaosjob.yaml; it "
        "sets the workers, entry, global batch and seed",
    )
    parser.add_argument("--workers", type=int, help="initial workers (default 4)")
    parser.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    parser.add_argument(
        "--example", help="bundled example: digits (default), chartransformer or bigstate"
    )
    parser.add_argument("--entry", help="module:factory of your own job (overrides --example)")
    parser.add_argument(
        "--churn",
        default="default",
        help="schedule such as 'leave:w2@40,crash:w1@80,link-down:w0-w3@100,"
        "link-up:w0-w3@120,join@150' (numbers are steps); 'none' turns churn off; "
        "'default' scales that schedule to --steps",
    )
    parser.add_argument(
        "--load-timeout",
        type=float,
        default=DEFAULT_LOAD_TIMEOUT_S,
        metavar="SECONDS",
        help="how long loading the entry once, before any worker starts, may take "
        f"(default {DEFAULT_LOAD_TIMEOUT_S:g})",
    )
    parser.add_argument("--global-batch", type=int, help="samples per step (default 64)")
    parser.add_argument("--seed", type=int, help="model and sample order seed (default 0)")
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
        "--join-probe-frames",
        type=int,
        default=0,
        metavar="N",
        help="64 KiB frames a newcomer pulls from each member to time its downlink before it "
        "asks to join (default 0: no probe; the pull measures every source as it goes and "
        "moves shards away from slow ones)",
    )
    parser.add_argument(
        "--join-strategy",
        choices=["greedy", "single", "equal", "proportional"],
        default="greedy",
        help="shard plan for joins: greedy (planned, default) or a baseline",
    )
    parser.add_argument(
        "--state-quorum",
        type=int,
        choices=[1, 2],
        default=1,
        help="members whose seals must agree on a newcomer's state: 1, as many as a join "
        "has, up to two (default); 2, always two, so one hostile member cannot hand a "
        "newcomer a forged state, and a job down to one member admits no newcomer",
    )
    parser.add_argument(
        "--spares",
        type=int,
        metavar="N",
        help="keep N warm spares: workers started ahead that wait imported and connected, "
        "so a join costs only its transfer; a join with no spare ready starts cold (default: "
        f"every joiner of the schedule is started ahead; 0..{MAX_SPARES})",
    )
    parser.add_argument(
        "--bucket-mb",
        type=mebibytes,
        dest="bucket_bytes",
        metavar="MIB",
        help="all-reduce bucket in MiB, as DDP's bucket_cap_mb (default 4); smaller buckets "
        "start sending while backward still runs, larger ones cost fewer messages",
    )
    parser.add_argument(
        "--micro-batch",
        type=positive_int,
        metavar="N",
        help="most samples a worker puts through one forward and backward pass; its share of "
        "a step is cut into micro-batches of N (memory only; default 64)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext worker links that anyone may connect to (default: mutual TLS 1.3, "
        "every worker with a certificate of a CA made for this run; for comparisons)",
    )
    from chaos_cli.local import durable

    durable.add_arguments(parser)
    parser.set_defaults(handler=handle)


def _downlinks(items: list[str]) -> dict[str, float]:
    from chaos_worker.net.shaping import ShapeError, parse_rate

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


MANIFEST_SETS = {
    "workers": ("--workers", "spec.replicas"),
    "example": ("--example", "spec.entry"),
    "entry": ("--entry", "spec.entry"),
    "global_batch": ("--global-batch", "spec.globalBatch"),
    "seed": ("--seed", "spec.seed"),
}


MANIFEST_MAY_SET = {
    "bucket_bytes": ("--bucket-mb", "spec.bucketKiB"),
    "micro_batch": ("--micro-batch", "spec.microBatch"),
}
"""Options a manifest may set; the flag is refused beside a manifest that does."""


def options_from(args: argparse.Namespace, job=None):
    """Validate the command line (and the manifest's job) into launcher options.

    UserError on bad input.
    """
    from chaos_worker.config import MAX_MICRO_BATCH, MAX_SEED
    from chaos_worker.examples import EXAMPLES

    from chaos_cli.local.churn import ChurnError, default_churn, parse_churn
    from chaos_cli.local.launcher import MAX_WORKERS, JobOptions, worker_names

    if job is not None:
        for dest, (flag, field) in MANIFEST_SETS.items():
            if getattr(args, dest) is not None:
                raise UserError(f"{flag} does not go with a manifest: {field} sets it")
        from chaos_cli.local.reconciled import run_options

        fixed = run_options(job)
        args.steps = fixed.get("steps", args.steps)  # spec.steps, when the manifest says
        for dest, (flag, field) in MANIFEST_MAY_SET.items():
            if dest in fixed:
                if getattr(args, dest) is not None:
                    raise UserError(f"{flag} does not go with a manifest that sets {field}")
                setattr(args, dest, fixed[dest])
        entry = fixed["entry"]
        example = next((k for k, v in EXAMPLES.items() if v == entry), entry)
    else:
        fixed = {
            "workers": 4 if args.workers is None else args.workers,
            "global_batch": 64 if args.global_batch is None else args.global_batch,
            "seed": 0 if args.seed is None else args.seed,
        }
        example = args.entry or args.example or DEFAULT_EXAMPLE
        entry = args.entry or EXAMPLES.get(example)
    if args.micro_batch is not None and args.micro_batch > MAX_MICRO_BATCH:
        raise UserError(f"--micro-batch must lie in 1..{MAX_MICRO_BATCH} (2**24)")
    workers = fixed["workers"]
    if not 1 <= workers <= MAX_WORKERS:
        raise UserError(f"--workers must lie in 1..{MAX_WORKERS}")
    if args.steps < 1:
        raise UserError("--steps must be at least 1")
    if not 0 <= args.join_probe_frames <= 64:
        raise UserError("--join-probe-frames must lie in 0..64")
    if not 1 <= fixed["global_batch"] <= MAX_GLOBAL_BATCH:
        where = f"{args.manifest}: spec.globalBatch:" if job else "--global-batch"
        raise UserError(f"{where} must lie in 1..{MAX_GLOBAL_BATCH} (2**24) to run locally")
    if not 0 < args.heartbeat_interval < args.failure_timeout < math.inf:
        raise UserError("need 0 < --heartbeat-interval < --failure-timeout, both finite")
    if not 0 < args.load_timeout < math.inf:
        raise UserError("--load-timeout must be a positive, finite number of seconds")
    if not 0 <= fixed["seed"] <= MAX_SEED:
        raise UserError(f"--seed must lie in 0..{MAX_SEED}")
    _check_device(args.device)
    _check_writable("--report", Path(args.report))
    if args.plot:
        _check_writable("--plot", Path(args.plot))
    if _plot_path(args).resolve() == Path(args.report).resolve():
        raise UserError(f"--plot {_plot_path(args)} is the --report file; give another --plot")
    if not 0 <= args.base_port <= 65535 - workers:
        raise UserError("--base-port must be a port number")
    if entry is None:
        raise UserError(f"--example {example!r} unknown; choose from {sorted(EXAMPLES)}")
    from chaos_cli.local.durable import checkpoint_options

    durable = checkpoint_options(args, entry=entry, seed=fixed["seed"], batch=fixed["global_batch"])
    start = durable.get("start_step", 0)
    spec = default_churn(workers, args.steps) if args.churn == "default" else args.churn
    if start and args.churn == "default":
        spec = "none"  # a resumed run injects only what it is told to
    try:
        churn = parse_churn(spec, workers, reconciled=job is not None)
    except ChurnError as exc:
        raise UserError(str(exc)) from None
    if any(e.step >= args.steps for e in churn):
        raise UserError(f"--churn: every event must come before the last step ({args.steps})")
    if any(e.step < start for e in churn):
        raise UserError(f"--churn: every event must come after the resumed step ({start})")
    if job is not None:
        from chaos_cli.local.reconciled import pod_churn

        churn = pod_churn(job, churn)
    from chaos_worker.net.shaping import ShapeError, parse_links

    from chaos_cli.local.profiles import resolve_links

    names = worker_names(workers, churn)
    if args.spares is not None and not 0 <= args.spares <= MAX_SPARES:
        raise UserError(f"--spares must lie in 0..{MAX_SPARES}")
    if args.spares is not None and job is not None:
        raise UserError(
            "--spares does not go with a manifest yet: its run starts a spare for "
            "every member its schedule makes"
        )
    if len(names) + (args.spares or 0) > MAX_WORKERS:
        raise UserError(f"--churn: {len(names)} workers in all; at most {MAX_WORKERS} run locally")
    try:
        links = resolve_links(args.links, names)
        named = {end for pair in parse_links(links) if pair != "*" for end in pair.split("|")}
    except ShapeError as exc:
        raise UserError(str(exc)) from None
    downlinks = _downlinks(args.downlink)
    for flag, unknown in (
        ("--links", named - set(names)),
        ("--downlink", set(downlinks) - set(names)),
    ):
        if unknown and job is None:  # a manifest's pods are named by the reconcile
            raise UserError(
                f"{flag} names {', '.join(sorted(unknown))}, not a worker of this run "
                f"({', '.join(names)})"
            )
    return JobOptions(
        entry=entry,
        workers=workers,
        steps=args.steps,
        global_batch=fixed["global_batch"],
        seed=fixed["seed"],
        dtype=args.dtype,
        device=args.device,
        churn=churn,
        base_port=args.base_port,
        heartbeat_interval_s=args.heartbeat_interval,
        failure_timeout_s=args.failure_timeout,
        example=example,
        metrics=args.metrics,
        links=links,
        downlinks=downlinks,
        join_mode=args.join_mode,
        join_strategy=args.join_strategy,
        join_probe_frames=args.join_probe_frames,
        state_quorum=args.state_quorum,
        netns=args.netns,
        tls=not args.insecure,
        spares=args.spares,
        bucket_bytes=args.bucket_bytes,
        micro_batch=args.micro_batch,
        **durable,
    )


def _check_device(name: str) -> None:
    """`cpu`, `cuda`, `cuda:N` or `auto`; `cuda` only where torch sees a GPU."""
    import re

    import torch

    if not re.fullmatch(r"cpu|auto|cuda(:\d{1,3})?", name):
        raise UserError(f"--device {name!r}: choose cpu, cuda, cuda:N or auto")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: torch sees no CUDA device here; use cpu or auto")


def _plot_path(args: argparse.Namespace) -> Path:
    """`--plot`, by default the report path with `.png`."""
    return Path(args.plot) if args.plot else Path(args.report).with_suffix(".png")


def _check_writable(flag: str, path: Path) -> None:
    """Fail now, not after the run, when `path` cannot be written."""
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder")
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise UserError(f"{flag} {path}: cannot write in {folder}")


def check_entry(options, timeout_s: float, where: str = "", job=None) -> None:
    """Load the job once, in a child process, so that a broken factory (one that raises,
    exits or hangs) fails before any worker starts.

    `where` prefixes the error (e.g. the manifest's `FILE: spec.entry: `); `job`: the
    manifest's ChaosJob, whose pod template's environment the factory sees."""
    from chaos_cli.local.entrycheck import load_error
    from chaos_cli.local.reconciled import trainer_env

    with tempfile.TemporaryDirectory(prefix="chaos-entry-") as scratch:
        error = load_error(
            options.entry,
            seed=options.seed,
            dtype=options.dtype,
            device=options.device,
            timeout_s=timeout_s,
            env=trainer_env(job, Path(scratch)) if job is not None else None,
        )
    if error:
        raise UserError(f"{where}{error}")


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def handle(args: argparse.Namespace) -> int:
    from chaos_cli.local.launcher import LaunchError, LocalRun
    from chaos_cli.local.live import LiveView
    from chaos_cli.local.report import plot_report, write_report

    job = None
    if args.manifest:
        from chaos_cli.local.reconciled import load_manifest

        job = load_manifest(args.manifest)
        if job.spec.suspend:  # what the operator does: no pods until it is unsuspended
            print(
                f"chaos run: {args.manifest}: the job is suspended (spec.suspend): no worker starts"
            )
            return 0
    options = options_from(args, job)
    signal.signal(signal.SIGTERM, _interrupt)  # clean up (processes, namespaces) as on Ctrl-C
    check_entry(options, args.load_timeout, f"{args.manifest}: spec.entry: " if job else "", job)
    if options.netns:
        from chaos_cli.local.netns import unavailable_reason

        if job is not None:
            raise UserError("--netns does not go with a manifest yet; use --links to shape")
        if why := unavailable_reason():
            print(
                f"chaos run: --netns unavailable ({why}); shaping links in-process", file=sys.stderr
            )
            options.netns = False
    live = LiveView(options, enabled=not args.quiet)
    try:
        if job is None:
            runner = LocalRun(options, on_update=live.update)
        else:
            from chaos_cli.local.reconciled import ReconciledJob, base_port_for

            base = base_port_for(options, args.base_port)
            runner = ReconciledJob(job, options, base_port=base, on_update=live.update)
        with live:
            report = asyncio.run(runner.run())
    except LaunchError as exc:
        raise (RunFailed if exc.failed else UserError)(str(exc)) from None
    report_path = Path(args.report)
    plot_path = _plot_path(args)
    write_report(report, report_path)
    plot_report(report, plot_path)
    live.summary(report, report_path, plot_path)
    found = list(report.problems)
    if math.isnan(report.final_loss) and not found:
        found.append("the final loss is not a number")
    for problem in found:
        print(f"chaos run: {problem}", file=sys.stderr)
    if not found and report.membership and not report.membership[-1]["members"]:
        print(f"chaos run: scaled to zero after step {report.steps - 1}: every member left")
    return 1 if found else 0
