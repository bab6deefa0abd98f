"""`chaos replicator`: serve a trainer's snapshots to newcomers, as the pod's sidecar does."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

from chaos_cli.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    from chaos_worker.replication.sidecar import add_arguments

    parser = sub.add_parser(
        "replicator",
        help="serve the snapshots a trainer publishes in a (memory-backed) directory",
        description="Serve snapshot manifests and shards to newcomers from the slot files a "
        "trainer writes with snapshot_dir set (in a pod: an emptyDir with medium Memory).",
    )
    add_arguments(parser)
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from chaos_worker.net.shaping import parse_links
    from chaos_worker.net.tls import TlsError
    from chaos_worker.net.transport import parse_address
    from chaos_worker.priority import exit_at_once
    from chaos_worker.replication.sidecar import options, serve

    directory = Path(args.dir)
    if not directory.is_dir():
        raise UserError(f"--dir {args.dir}: no such directory")
    try:
        host, port = parse_address(args.listen)
    except ValueError as exc:
        raise UserError(f"--listen: {exc}") from None
    try:
        parse_links(args.links)
        kwargs = options(args)
    except ValueError as exc:  # ShapeError included
        raise UserError(str(exc)) from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s replicator %(message)s")
    try:
        asyncio.run(serve(args.id, directory, host, port, **kwargs))
    except TlsError as exc:
        raise UserError(str(exc)) from None
    except OSError as exc:
        raise UserError(f"--listen {args.listen}: {exc.strerror or exc}") from None
    exit_at_once(0)
