"""`chaos replicator`: serve a trainer's snapshots to newcomers, as the pod's sidecar does."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

from chaos_operator.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "replicator",
        help="serve the snapshots a trainer publishes in a (memory-backed) directory",
        description="Serve snapshot manifests and shards to newcomers from the slot files a "
        "trainer writes with snapshot_dir set (in a pod: an emptyDir with medium Memory).",
    )
    parser.add_argument("--id", required=True, help="member id of the trainer beside it")
    parser.add_argument("--dir", required=True, help="the trainer's snapshot_dir")
    parser.add_argument("--listen", default="127.0.0.1:0", help="host:port (default any port)")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from chaos_worker.replication import Replicator
    from chaos_worker.snapshot import SnapshotStore
    from chaos_worker.transport import parse_address

    directory = Path(args.dir)
    if not directory.is_dir():
        raise UserError(f"--dir {args.dir}: no such directory")
    try:
        host, port = parse_address(args.listen)
    except ValueError as exc:
        raise UserError(f"--listen: {exc}") from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s replicator %(message)s")

    async def serve() -> None:
        replicator = Replicator(args.id, SnapshotStore(directory))
        try:
            address = await replicator.start(host, port)
        except OSError as exc:
            raise UserError(f"--listen {args.listen}: {exc.strerror or exc}") from None
        print(f"serving {directory} on {address}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await replicator.close()

    asyncio.run(serve())
    return 0
