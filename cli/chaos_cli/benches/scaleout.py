"""scale-out delay of a join by strategy, state size and shaped neighbour bandwidths

Every run is a real local job: N incumbents train the `bigstate` example (the digits MLP
plus a frozen table that sizes the state, so the step stays compute-bound) and one newcomer
joins at step JOIN_STEP over token-bucket links to each incumbent. Strategies `chaos`
(planned multi-neighbour), `single`, `equal` and `proportional` differ only in the shard
plan; all of them pull while observing, so incumbents never wait for the transfer.
`checkpoint` is torchrun-style stop-the-world, composed of measured parts: save the state to
disk, restart every member (the measured worker start-up of the same job), read the file
through a token bucket at the newcomer's downlink, load it. Its stall is all of that.

`--starts`: the newcomer is a warm spare (started with the job, in standby until the join)
and/or starts cold at the join step; both report launch to first contributing step, and
with cold a bare process (torch and the factory, nothing of Chaos) is timed beside the same
incumbents as the baseline of the cold target.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from chaos_worker.net.shaping import ShapeError

from chaos_cli.argtypes import positive_ints
from chaos_cli.benches._measure import (
    BUSY_FAILURE_TIMEOUT_S,
    bare_process,
    bare_start_s,
    checkpoint_round_trip,
)

if TYPE_CHECKING:
    from chaos_worker.net.shaping import TokenBucket

JOIN_STEP = 30
STARTS = ("warm", "cold")
STRATEGIES = ("chaos", "single", "equal", "proportional", "checkpoint")
PROFILES = {
    "equal": (50e6, 50e6, 50e6, 50e6),
    "heterogeneous": (25e6, 50e6, 100e6, 200e6),
}
SOLVER = {"chaos": "greedy", "single": "single", "equal": "equal", "proportional": "proportional"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sizes", type=positive_ints, default=[16, 64, 256], help="state sizes in MB"
    )
    parser.add_argument(
        "--neighbours", type=positive_ints, default=[1, 2, 3, 4], help="incumbents (1-4)"
    )
    parser.add_argument(
        "--strategies",
        default=",".join(STRATEGIES),
        help=f"comma-separated subset of {','.join(STRATEGIES)}",
    )
    parser.add_argument(
        "--profiles",
        default="equal,heterogeneous",
        help="bandwidth profiles: equal (50 MB/s each) and/or heterogeneous (25/50/100/200)",
    )
    parser.add_argument(
        "--links",
        default="",
        metavar="SPEC",
        help="shape every link from a bundled profile (e.g. @three-party, workers w0.. then the "
        "newcomer) instead of --profiles; the newcomer's links give the bandwidths",
    )
    parser.add_argument(
        "--netns",
        action="store_true",
        help="run every job in the network-namespace testbed, rates shaped by tc (root)",
    )
    parser.add_argument(
        "--global-batch",
        type=int,
        default=1024,
        help="samples per step (default 1024: a compute-bound step on this example)",
    )
    parser.add_argument(
        "--compute-us",
        type=float,
        default=100.0,
        help="accelerator time per sample, slept so the host CPU stays free (default 100)",
    )
    parser.add_argument(
        "--starts",
        default="warm,cold",
        help="how the newcomer starts: warm (a spare waiting since the job started) and/or "
        "cold (spawned at the join step); with cold, a bare process's start (torch and the "
        "factory) is timed beside the same incumbents as a baseline",
    )
    parser.add_argument(
        "--downlink",
        type=float,
        default=400e6,
        help="newcomer downlink in bytes/s (default 400e6)",
    )


def run(args: argparse.Namespace) -> dict:
    from chaos_cli.errors import UserError
    from chaos_cli.local.launcher import LaunchError

    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    profiles = [p.strip() for p in args.profiles.split(",") if p.strip()]
    starts = [s.strip() for s in args.starts.split(",") if s.strip()]
    if not starts or [s for s in starts if s not in STARTS]:
        raise UserError(f"--starts: choose from {list(STARTS)}")
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise UserError(f"--strategies: unknown {unknown}; choose from {list(STRATEGIES)}")
    if [p for p in profiles if p not in PROFILES]:
        raise UserError(f"--profiles: choose from {sorted(PROFILES)}")
    if any(n > 4 for n in args.neighbours):
        raise UserError("--neighbours: at most 4")
    if args.links:
        profiles = [args.links]
        try:
            for neighbours in args.neighbours:
                profile_links(args.links, neighbours)
        except ShapeError as exc:
            raise UserError(str(exc)) from None
    if args.netns:
        from chaos_cli.local.netns import unavailable_reason

        if why := unavailable_reason():
            raise UserError(f"--netns unavailable: {why}")
    runs = []
    for size in args.sizes:
        for neighbours in args.neighbours:
            for profile in profiles if neighbours > 1 else profiles[:1]:
                links, bandwidths = profile_links(profile, neighbours)
                startup: list[float] = []
                bare = None
                if "cold" in starts:
                    print(
                        f"scaleout: {size} MB, {neighbours} x {profile}, bare process",
                        file=sys.stderr,
                        flush=True,
                    )
                    bare = _bare_run(size, links, bandwidths, args)
                    runs.append(bare | {"profile": profile})
                for strategy, start in [
                    (s, start) for s in strategies if s != "checkpoint" for start in starts
                ]:
                    label = f"{size} MB, {neighbours} x {profile}, {strategy}, {start}"
                    print(f"scaleout: {label}", file=sys.stderr, flush=True)
                    try:
                        result = _join_run(size, links, bandwidths, strategy, args, start=start)
                    except LaunchError as exc:  # one failed run must not lose the others
                        runs.append(
                            {
                                "state_mb": size,
                                "neighbours": neighbours,
                                "strategy": strategy,
                                "start": start,
                                "error": str(exc),
                            }
                        )
                        continue
                    startup.append(result["startup_s"])
                    runs.append(with_target(result, bare) | {"profile": profile})
                if "checkpoint" in strategies:
                    restart = statistics.median(startup) if startup else _bare_start_s(size)
                    runs.append(
                        _checkpoint(size, bandwidths, args.downlink, restart) | {"profile": profile}
                    )
    return {"join_step": JOIN_STEP, "downlink_bytes_per_s": args.downlink, "runs": runs}


def profile_links(profile: str, neighbours: int) -> tuple[str, list[float]]:
    """Link spec for incumbents w0.. and the newcomer w<neighbours>, and the bandwidth of
    each incumbent's link to the newcomer: a named bandwidth profile shapes only those
    links; a `--links` spec (e.g. @three-party) shapes every link as it says."""
    newcomer = f"w{neighbours}"
    if profile in PROFILES:
        bandwidths = list(PROFILES[profile][:neighbours])
        spec = ",".join(f"w{i}-{newcomer}={b:.0f}B/s" for i, b in enumerate(bandwidths))
        return spec, bandwidths
    from chaos_worker.net.shaping import parse_links, shape_for

    from chaos_cli.local.profiles import resolve_links

    spec = resolve_links(profile, [f"w{i}" for i in range(neighbours + 1)])
    shapes = parse_links(spec)
    rates = [shape_for(shapes, f"w{i}", newcomer).rate_bytes_per_s for i in range(neighbours)]
    if any(rate is None for rate in rates):
        raise ShapeError(f"--links: every link to the newcomer {newcomer} needs a rate")
    return spec, [float(rate) for rate in rates if rate is not None]


def with_target(run: dict, bare: dict | None) -> dict:
    """`run` with the issue's target for its launch to first contributing step: from a
    warm spare 1 s + 1.25 x the limit; cold, a bare process's start + 1.25 x the limit."""
    base = 1.0 if run["start"] == "warm" else (bare or {}).get("bare_start_s")
    if base is None or run.get("launch_to_first_step_s") is None:
        return run | {"target_s": None, "met": None}
    target = round(base + 1.25 * run["limit_s"], 3)
    return run | {"target_s": target, "met": run["launch_to_first_step_s"] <= target}


def _bare_run(size_mb: int, links: str, bandwidths: list[float], args) -> dict:
    """The baseline: the incumbents train as in a join run, and at the join step a bare
    process (the interpreter, torch and the factory, nothing of Chaos) starts beside them;
    its wall time, then the job ends."""
    import subprocess

    from chaos_worker.examples import EXAMPLES

    from chaos_cli.local.launcher import LocalRun

    options = _bigstate_job(size_mb, links, bandwidths, args)
    timing: dict[str, float] = {}
    bare: list[subprocess.Popen] = []

    def watch(job: LocalRun) -> None:
        if not bare and job.max_step >= JOIN_STEP:
            timing["start"] = time.monotonic()
            bare.append(bare_process(EXAMPLES["bigstate"]))
        elif bare and bare[0].poll() is not None and "end" not in timing:
            timing["end"] = time.monotonic()
            job.stop()

    asyncio.run(LocalRun(options, on_update=watch).run())
    ok = bare and bare[0].returncode == 0 and "end" in timing
    return {
        "state_mb": size_mb,
        "neighbours": len(bandwidths),
        "strategy": "bare-process",
        "bare_start_s": round(timing["end"] - timing["start"], 3) if ok else None,
    }


def _bigstate_job(size_mb: int, links: str, bandwidths: list[float], args, **extra):
    """The incumbents' job of every run: `bigstate` of `size_mb` MB on `links`, run until
    stopped; `extra`: more `JobOptions` (the join, the spares)."""
    from chaos_worker.examples import EXAMPLES
    from chaos_worker.examples.bigstate import COMPUTE_ENV, ENV

    from chaos_cli.local.launcher import JobOptions

    os.environ[ENV] = str(size_mb)
    os.environ[COMPUTE_ENV] = str(args.compute_us)
    return JobOptions(
        entry=EXAMPLES["bigstate"],
        workers=len(bandwidths),
        steps=1_000_000,
        global_batch=args.global_batch,
        example="bigstate",
        links=links,
        failure_timeout_s=BUSY_FAILURE_TIMEOUT_S,  # five processes share two cores
        netns=args.netns,
        **extra,
    )


def _join_run(
    size_mb: int,
    links: str,
    bandwidths: list[float],
    strategy: str,
    args: argparse.Namespace,
    *,
    start: str = "warm",
) -> dict:
    from chaos_cli.local.churn import parse_churn
    from chaos_cli.local.launcher import LocalRun

    newcomer = f"w{len(bandwidths)}"
    downlink = args.downlink
    options = _bigstate_job(
        size_mb,
        links,
        bandwidths,
        args,
        churn=parse_churn(f"join@{JOIN_STEP}", len(bandwidths)),
        downlinks={newcomer: downlink},
        join_strategy=SOLVER[strategy],
        stop_after_join_steps=10,
        spares=1 if start == "warm" else 0,  # warm: the newcomer waits as a spare from the start
    )
    job = LocalRun(options)
    report = asyncio.run(job.run())
    join = next((e for e in report.events if e.type == "join"), None)
    pulled = report.joins[0] if report.joins else {}
    per_source = pulled.get("bytes_per_source", {})
    state_bytes = sum(per_source.values()) or int(size_mb * 1e6)
    publish = [r["publish_s"] for r in job.timeline.of("progress") if "publish_s" in r]
    ready = {r["worker"]: r["t"] for r in job.timeline.of("standby")}
    spawned = job.spawned_at.get(newcomer, 0.0)
    startup = (ready.get(newcomer) or _connected(job, newcomer)) - spawned
    launched = next((f.at for f in job.timeline.fired if f.event.kind == "join"), None)
    joined = [r["t"] for r in job.timeline.of("joined") if r["worker"] == newcomer]
    first_step = round(min(joined) - launched, 3) if joined and launched is not None else None
    return {
        "state_mb": size_mb,
        "neighbours": len(bandwidths),
        "bandwidths_bytes_per_s": bandwidths,
        "strategy": strategy,
        "start": start,
        "launch_to_first_step_s": first_step,
        "scale_out_delay_s": join.scale_out_delay_s if join else None,
        "startup_s": round(startup, 3),
        "startup_phases_s": startup_phases(job.timeline.records, newcomer, spawned),
        "incumbent_stall_s": join.incumbent_stall_s if join else None,
        "incumbent_slowdown_s": join.incumbent_slowdown_s if join else None,
        "step_time_s": round(report.step_time_s, 5) if report.step_time_s else None,
        "limit_s": round(state_bytes / min(downlink, sum(bandwidths)), 4),
        "bytes_per_source": per_source,
        "path": pulled.get("path"),
        "pull_s": round(pulled["pull_s"], 4) if "pull_s" in pulled else None,
        "snapshot_publish_s": round(statistics.median(publish), 6) if publish else None,
    }


def _connected(job, worker: str) -> float:
    """When `worker` was started up and connected (a cold newcomer has no standby)."""
    for record in job.timeline.of("ready"):
        if record["worker"] == worker:
            return float((record.get("phases") or {}).get("connected", 0.0))
    return 0.0


def startup_phases(records: list[dict], worker: str, spawned: float) -> dict[str, float]:
    """Seconds from `worker`'s spawn to the end of each start-up phase it reported with
    `ready` (main: interpreter and CLI; imported: torch and the worker; built: the
    factory; member: its rooms; replicator: its process serves; connected: listening and
    reporting), and to `standby` if it went into standby."""
    phases: dict[str, float] = {}
    for record in records:
        if record.get("worker") != worker:
            continue
        if record.get("kind") == "ready" and isinstance(record.get("phases"), dict):
            phases.update(record["phases"])
        elif record.get("kind") == "standby":
            phases["standby"] = record["t"]
    return {name: round(t - spawned, 3) for name, t in sorted(phases.items(), key=lambda p: p[1])}


def _bare_start_s(size_mb: int) -> float:
    """A bare process's start of the job (when no join run measured a start-up)."""
    from chaos_worker.examples import EXAMPLES
    from chaos_worker.examples.bigstate import ENV

    return bare_start_s(EXAMPLES["bigstate"], {ENV: str(size_mb)})


def _checkpoint(size_mb: int, bandwidths: list[float], downlink: float, restart_s: float) -> dict:
    """Save, restart every member, read at the newcomer's downlink, load: all measured."""
    import torch
    from chaos_worker.examples.bigstate import ENV, factory
    from chaos_worker.net.shaping import TokenBucket

    os.environ[ENV] = str(size_mb)
    model, optimizer, _ = factory(seed=0, dtype=torch.float32, device=torch.device("cpu"))
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    measured = checkpoint_round_trip(
        state, read=lambda path: asyncio.run(_shaped_read(path, TokenBucket(downlink)))
    )
    save_s, load_s, size = measured.save_s, measured.load_s, measured.bytes
    stop_s = save_s + restart_s + load_s
    return {
        "state_mb": size_mb,
        "neighbours": len(bandwidths),
        "bandwidths_bytes_per_s": bandwidths,
        "strategy": "checkpoint",
        "scale_out_delay_s": round(stop_s, 4),
        "startup_s": round(restart_s, 3),
        "incumbent_stall_s": round(stop_s, 4),
        "incumbent_slowdown_s": round(stop_s, 4),
        "step_time_s": None,
        "limit_s": round(size / min(downlink, sum(bandwidths)), 4),
        "bytes_per_source": {"storage": size},
        "path": "stop-the-world",
        "save_s": round(save_s, 4),
        "load_s": round(load_s, 4),
    }


async def _shaped_read(path: Path, bucket: TokenBucket, piece: int = 1 << 20) -> bytes:
    """Read `path` no faster than `bucket` allows (a remote store behind the downlink)."""
    chunks = []
    with path.open("rb") as handle:
        while chunk := handle.read(piece):
            await bucket.consume(len(chunk))
            chunks.append(chunk)
    return b"".join(chunks)
