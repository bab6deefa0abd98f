"""steady-state step time of Chaos against torch DDP (gloo), same model, workers and batch

For every model (`--sizes` of the 4-layer `mlp` example, and `--examples`, by default the
chartransformer), `--rounds` times over, alternating which side goes first: DDP (`_ddp.py`:
spawned ranks on loopback, gloo) and Chaos (a local `chaos run` of the same entry with no
churn, mutual TLS unless `--insecure`), each `--workers` processes with one torch thread,
global batch `--global-batch`, `--steps` steps. A side's step time is the median gap
between consecutive completed steps (Chaos: the first report of each step, as the run
report's `step_time_s`; DDP: rank 0's stamps after `optimizer.step()`), the first
`--warmup` steps excluded. `ratio` is Chaos over DDP (1.0: as fast). Chaos's
`compute_s` is its members' median compute time per step (the slice over the measured
samples/s), so `step_s - compute_s` is about what the all-reduce and apply add.
`cpu_s` is the CPU seconds a process spends per step over the same steps (every thread;
the median over processes): on a machine shared with other load, wall times swing with
that load, the CPU each side spends per step much less (`cpu_ratio`). `ratios_by_round`
pairs each round's two sides, which ran back to back: on a shared machine their spread
can exceed the difference being measured (two one-round runs of one configuration gave
1.16 and 1.54 on a shared 2-core VM), so compare medians of five rounds or more.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import statistics
import sys
from pathlib import Path

from chaos_worker.config import BUCKET_BYTES

from chaos_cli.argtypes import mebibytes, positive_int
from chaos_cli.benches._measure import (
    BUSY_FAILURE_TIMEOUT_S,
    example_model,
    mlp_model,
    mlp_params,
    param_count,
    steady_step_s,
)
from chaos_cli.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sizes",
        default="1M,10M",
        help="parameter counts of the mlp example, comma-separated (default 1M,10M; '' none)",
    )
    parser.add_argument(
        "--examples",
        default="chartransformer",
        help="bundled examples to run too, comma-separated (default chartransformer; '' none)",
    )
    parser.add_argument("--workers", type=positive_int, default=2, help="processes (default 2)")
    parser.add_argument("--steps", type=positive_int, default=60, help="steps (default 60)")
    parser.add_argument(
        "--warmup", type=int, default=10, help="first steps left out of the median (default 10)"
    )
    parser.add_argument(
        "--global-batch", type=positive_int, default=64, help="samples per step (default 64)"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument(
        "--rounds", type=positive_int, default=1, help="runs of each side per model (default 1)"
    )
    parser.add_argument("--insecure", action="store_true", help="Chaos links in plain TCP")
    parser.add_argument(
        "--bucket-mb",
        type=mebibytes,
        dest="bucket_bytes",
        metavar="MIB",
        help="Chaos's all-reduce bucket in MiB (default: the worker's, 4)",
    )


def run(args: argparse.Namespace) -> dict:
    if args.warmup < 0 or args.warmup + 2 > args.steps:
        raise UserError("--warmup: must be >= 0 and leave at least 2 steps of --steps")
    models: list[tuple[str, str, str | None]] = [mlp_model(s) for s in _names(args.sizes)]
    models += [example_model(name) for name in _names(args.examples)]  # label, entry, size
    if not models:
        raise UserError("nothing to run: give --sizes or --examples")
    results = [_model(label, entry, size, args) for label, entry, size in models]
    return {
        "workers": args.workers,
        "global_batch": args.global_batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "device": args.device,
        "dtype": args.dtype,
        "tls": not args.insecure,
        "bucket_bytes": args.bucket_bytes or BUCKET_BYTES,
        "models": results,
    }


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _model(label: str, entry: str, size: str | None, args: argparse.Namespace) -> dict:
    ddp: list[dict] = []
    chaos: list[dict] = []
    with mlp_params(size):
        params = param_count(entry)
        for round_ in range(args.rounds):
            order = (("ddp", ddp), ("chaos", chaos))
            for side, into in order if round_ % 2 == 0 else order[::-1]:
                print(f"throughput: {label} {side} round {round_ + 1}", file=sys.stderr)
                into.append(_ddp(entry, args) if side == "ddp" else _chaos(entry, args))
    ddp_s = statistics.median(r["step_s"] for r in ddp)
    chaos_s = statistics.median(r["step_s"] for r in chaos)
    return {
        "model": label,
        "params": params,
        "ddp": _side(ddp),
        "chaos": _side(chaos),
        "ratio": round(chaos_s / ddp_s, 3),
        "cpu_ratio": _ratio(_side(chaos)["cpu_s"], _side(ddp)["cpu_s"]),
        # each round's two sides ran back to back: their spread shows the machine's noise
        "ratios_by_round": [
            round(c["step_s"] / d["step_s"], 3) for d, c in zip(ddp, chaos, strict=True)
        ],
    }


def _ratio(chaos: float | None, ddp: float | None) -> float | None:
    return round(chaos / ddp, 3) if chaos and ddp else None


def _side(runs: list[dict]) -> dict:
    steps = [r["step_s"] for r in runs]
    out = {
        "step_s": round(statistics.median(steps), 5),
        "runs_step_s": [round(s, 5) for s in steps],
        "steps": [r["steps"] for r in runs],
    }
    cpu = [r["cpu_s"] for r in runs if r.get("cpu_s") is not None]
    out["cpu_s"] = round(statistics.median(cpu), 5) if cpu else None
    compute = [r["compute_s"] for r in runs if r.get("compute_s") is not None]
    if compute:
        out["compute_s"] = round(statistics.median(compute), 5)
    return out


def _ddp(entry: str, args: argparse.Namespace) -> dict:
    from chaos_cli.benches import _ddp

    result = _ddp.train(
        entry,
        workers=args.workers,
        steps=args.steps,
        global_batch=args.global_batch,
        dtype=args.dtype,
        device=args.device,
    )
    w = args.warmup
    cpu = [(c[-1] - c[w]) / (len(c) - 1 - w) for c in result.cpu_s]
    return {
        "step_s": steady_step_s(result.step_stamps, args.warmup),
        "steps": len(result.step_stamps),
        "cpu_s": statistics.median(cpu),
    }


def _chaos(entry: str, args: argparse.Namespace) -> dict:
    from chaos_cli.local.launcher import JobOptions, LocalRun

    options = JobOptions(
        entry=entry,
        workers=args.workers,
        steps=args.steps,
        global_batch=args.global_batch,
        dtype=args.dtype,
        device=args.device,
        tls=not args.insecure,
        failure_timeout_s=BUSY_FAILURE_TIMEOUT_S,
        bucket_bytes=args.bucket_bytes,
    )
    cpu = _CpuSampler(args.warmup, args.steps - 1)
    job = LocalRun(options, on_update=cpu.sample)
    report = asyncio.run(job.run())
    if report.problems:
        raise UserError(f"chaos run of {entry}: {'; '.join(report.problems)}")
    times = job.timeline.step_times()
    stamps = [times[s] for s in sorted(times)]
    compute = [
        r["slice"][1] / r["samples_per_s"]
        for r in job.timeline.of("progress")
        if r["step"] >= args.warmup and r.get("slice") and r.get("samples_per_s")
    ]
    return {
        "step_s": steady_step_s(stamps, args.warmup),
        "steps": report.steps,
        "compute_s": statistics.median(compute) if compute else None,
        "cpu_s": cpu.per_step(),
    }


class _CpuSampler:
    """CPU seconds per step of every worker process of a local run, from /proc: sampled on
    every supervision round from the first step past warm-up on, while every worker still
    lives (the last rounds may come after the workers exited, so the span ends at the
    latest round that could read them all)."""

    def __init__(self, first: int, last: int) -> None:
        self._first, self._last = first, last
        self._start: tuple[int, dict[str, float]] | None = None
        self._end: tuple[int, dict[str, float]] | None = None

    def sample(self, job) -> None:
        step = min(job.max_step, self._last)
        if step < self._first or (self._end is not None and self._end[0] >= self._last):
            return
        cpu = {n: _cpu_of(p.popen.pid) for n, p in job.procs.items()}
        if any(math.isnan(c) for c in cpu.values()):
            return  # a worker has exited: its CPU is no longer readable
        if self._start is None:
            self._start = (step, cpu)
        self._end = (step, cpu)

    def per_step(self) -> float | None:
        if self._start is None or self._end is None or self._end[0] <= self._start[0]:
            return None
        (s0, c0), (s1, c1) = self._start, self._end
        return statistics.median((c1[n] - c0[n]) / (s1 - s0) for n in c0 if n in c1)


def _cpu_of(pid: int) -> float:
    """User and system CPU seconds of process `pid` (every thread), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
