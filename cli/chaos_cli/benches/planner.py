"""solve times of the exact greedy shard planner against the MILP (CBC)

Random but seeded instances: state 1 GiB, bandwidths 1-100 MB/s, latencies 0-50 ms,
ready times 0-0.5 s, shard counts 1 | 2 | 4 | ... | max_shards. Times are medians of
`time.perf_counter` over the repetitions, in milliseconds.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

from chaos_cli.argtypes import positive_int, positive_ints


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sources",
        type=positive_ints,
        default=[10, 100, 1000],
        metavar="N,N,...",
        help="instance sizes (default 10,100,1000)",
    )
    parser.add_argument(
        "--max-shards",
        type=_power_of_two,
        default=4096,
        help="largest shard count of the chain 1|2|4|...; a power of two (default 4096)",
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=5, help="greedy runs per size (default 5)"
    )
    parser.add_argument(
        "--milp-repeats", type=positive_int, default=1, help="MILP runs per size (default 1)"
    )
    parser.add_argument(
        "--milp-max-sources",
        type=int,
        default=100,
        help="skip the MILP above this many sources (default 100; 0 skips it)",
    )
    parser.add_argument("--seed", type=int, default=0, help="instance seed (default 0)")


def run(args: argparse.Namespace) -> dict:
    from chaos_planner.greedy import solve_greedy
    from chaos_planner.milp import solve_milp

    runs = []
    for count in args.sources:
        request = instance(count, args.max_shards, args.seed)
        greedy_ms, greedy = _median_ms(lambda r=request: solve_greedy(r), args.repeats)
        row: dict = {
            "sources": count,
            "max_shards": args.max_shards,
            "greedy_ms": round(greedy_ms, 3),
            "greedy_shards": greedy.shards,
            "greedy_makespan_s": greedy.makespan_s,
        }
        if count > args.milp_max_sources:
            row |= {
                "milp_ms": None,
                "milp_skipped": f"more than --milp-max-sources={args.milp_max_sources} sources",
                "speedup": None,
            }
        else:
            milp_ms, milp = _median_ms(lambda r=request: solve_milp(r), args.milp_repeats)
            row |= {
                "milp_ms": round(milp_ms, 3),
                "milp_shards": milp.shards,
                "milp_makespan_s": milp.makespan_s,
                "speedup": round(milp_ms / greedy_ms, 1),
            }
        runs.append(row)
    return {
        "solvers": ["greedy", "milp"],
        "state_bytes": 2**30,
        "repeats": {"greedy": args.repeats, "milp": args.milp_repeats},
        "seed": args.seed,
        "runs": runs,
    }


def instance(count: int, max_shards: int, seed: int):
    """A seeded random request with `count` heterogeneous sources."""
    from chaos_planner import PlanRequest, Source

    rng = random.Random(f"{seed}/{count}")
    return PlanRequest(
        state_bytes=2**30,
        shard_counts=[2**i for i in range(max_shards.bit_length())],
        sources=[
            Source(
                id=f"s{i:04d}",
                bandwidth_bytes_per_s=rng.uniform(1e6, 100e6),
                latency_s=rng.uniform(0.0, 0.05),
                ready_s=rng.uniform(0.0, 0.5),
            )
            for i in range(count)
        ],
    )


def _median_ms(solve: Callable[[], object], repeats: int):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = solve()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), result


def _power_of_two(text: str) -> int:
    value = positive_int(text)
    if value & (value - 1):
        raise argparse.ArgumentTypeError(f"must be a power of two, got {value}")
    return value
