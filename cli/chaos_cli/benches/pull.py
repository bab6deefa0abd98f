"""one snapshot pulled from replicator processes alone, with no training: the data path's ceiling

A snapshot of `--sizes` MB (a frozen table) is published into one private directory per
neighbour in /dev/shm, each served by its own replicator process (what a trainer without a
sidecar starts), its link to the newcomer shaped as in `chaos bench scaleout`'s profiles.
One `Puller` fetches it with the root's plan (`--strategy`) through the newcomer's
downlink and checks every shard. Nothing else runs on the host, so `pull_s` against
`limit_s` shows what the data path reaches when the CPUs are its own; `bench scaleout`
runs the same pull beside training workers.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from chaos_cli.argtypes import positive_ints
from chaos_cli.benches.scaleout import PROFILES, profile_links

STRATEGIES = ("greedy", "single", "equal", "proportional")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sizes", type=positive_ints, default=[64], metavar="MB,...", help="(default 64)"
    )
    parser.add_argument(
        "--neighbours", type=positive_ints, default=[3, 4], metavar="N,...", help="(default 3,4)"
    )
    parser.add_argument(
        "--profiles",
        default="equal,heterogeneous",
        help="bandwidth profiles, as `bench scaleout` (default equal,heterogeneous)",
    )
    parser.add_argument("--strategy", default="greedy", choices=STRATEGIES)
    parser.add_argument(
        "--downlink", type=float, default=400e6, help="newcomer downlink in bytes/s (400e6)"
    )


def run(args: argparse.Namespace) -> dict:
    from chaos_cli.errors import UserError

    profiles = [p.strip() for p in args.profiles.split(",") if p.strip()]
    unknown = [p for p in profiles if p not in PROFILES]
    if unknown:
        raise UserError(f"--profiles: unknown {unknown}; choose from {list(PROFILES)}")
    too_many = [n for n in args.neighbours if n > len(PROFILES["heterogeneous"])]
    if too_many:
        raise UserError(f"--neighbours: at most {len(PROFILES['heterogeneous'])}")
    runs = []
    for size in args.sizes:
        for neighbours in args.neighbours:
            for profile in profiles:
                print(f"pull: {size} MB, {neighbours} x {profile}", file=sys.stderr, flush=True)
                runs.append(
                    asyncio.run(_pull(size, neighbours, profile, args.strategy, args.downlink))
                )
    return {"downlink_bytes_per_s": args.downlink, "strategy": args.strategy, "runs": runs}


async def _pull(size_mb: int, neighbours: int, profile: str, strategy: str, downlink: float):
    import torch
    from chaos_planner.models import Source
    from chaos_worker.config import WorkerConfig
    from chaos_worker.join.plan import shard_plan
    from chaos_worker.net.shaping import TokenBucket
    from chaos_worker.net.wire import JoinPlan
    from chaos_worker.replication.puller import Puller
    from chaos_worker.replication.sidecar import start_child
    from chaos_worker.replication.snapshot import SnapshotStore

    links, bandwidths = profile_links(profile, neighbours)
    newcomer = f"w{neighbours}"
    model = torch.nn.Linear(1, 1)
    model.register_buffer("table", torch.zeros(size_mb * 250_000))  # 4-byte floats
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(dir=shm if shm.is_dir() else None) as root:
        directories = [Path(root) / f"w{i}" for i in range(neighbours)]
        for directory in directories:
            SnapshotStore(directory).publish(1, model, optimizer)
        total = SnapshotStore(directories[0]).get(1).layout.total_bytes
        children = []
        try:
            for i, directory in enumerate(directories):
                children.append(await start_child(f"w{i}", directory, "127.0.0.1", links=links))
            overhead = WorkerConfig.model_fields["shard_overhead_s"].default
            sources = [
                Source(id=f"w{i}", bandwidth_bytes_per_s=b, latency_s=overhead)
                for i, b in enumerate(bandwidths)
            ]
            plan = shard_plan(total, sources, strategy)
            assignment = plan.shard_indices()
            join = JoinPlan(
                id="bench",
                origin="w0",
                joiner=newcomer,
                joiner_address="127.0.0.1:0",  # nobody dials the puller
                step=1,
                state_bytes=total,
                shards=plan.shards,
                assignment=assignment,
                replicators={m: children[int(m[1:])].address for m in assignment},
                bandwidths={s.id: s.bandwidth_bytes_per_s for s in sources},
                manifest_from=next(iter(assignment)),
                predicted_s=plan.makespan_s,
                strategy=strategy,
            )
            started = time.perf_counter()
            result = await Puller(newcomer, join, downlink=TokenBucket(downlink)).run()
            pull_s = time.perf_counter() - started
        finally:
            for child in children:
                await child.stop()
    limit_s = total / min(downlink, sum(bandwidths))
    return {
        "state_mb": size_mb,
        "neighbours": neighbours,
        "profile": profile,
        "bandwidths_bytes_per_s": bandwidths,
        "pull_s": round(pull_s, 4),
        "limit_s": round(limit_s, 4),
        "ratio": round(pull_s / limit_s, 3),
        "predicted_s": round(plan.makespan_s, 4),
        "rebalances": result.rebalances,
        "bytes_per_source": result.bytes_per_source,
    }
