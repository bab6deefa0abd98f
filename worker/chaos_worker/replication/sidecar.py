"""The replicator as a process of its own: it serves the snapshot slot files that a
trainer writes to a memory-backed directory, so that serving shards to a newcomer never
competes with the training loop for the trainer's interpreter.

In a pod it is the `replicator` container (`chaos replicator`); a trainer with no sidecar
starts one as its child (`start_child`). It prints `serving DIR on HOST:PORT` once
listening, and keeps what it sent per peer in the directory (`ledger.SentLedger`), which
the trainer counts in its replication metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from chaos_worker.config import TlsFiles, WorkerConfig
from chaos_worker.net.bounds import Rejections
from chaos_worker.net.shaping import delays_only, parse_links, shape_for
from chaos_worker.net.signing import Signer
from chaos_worker.net.tls import LinkTls
from chaos_worker.net.transport import TcpTransport, parse_address
from chaos_worker.priority import (
    die_with_parent,
    exit_at_once,
    ignore_from_now,
    lower_this_thread,
)
from chaos_worker.replication.ledger import HANDSHAKES_FILE, REFUSED_FILE, SentLedger
from chaos_worker.replication.private import PrivateDirectory
from chaos_worker.replication.replicator import Replicator
from chaos_worker.replication.snapshot import SnapshotStore

START_TIMEOUT_S = 60.0
STOP_GRACE_S = 1.0
"""How long a trainer lets its child replicator exit on SIGTERM before killing it. The
child runs at lower priority (`priority.lower_this_thread`): on a busy machine its
graceful exit (closing links, the interpreter's teardown) can take many seconds, and all
it would still do is flush a ledger nobody reads any more (the trainer has exited its
loop and removes the directory itself). Waiting longer held the trainer's own exit past
`chaos run`'s grace, which then terminated it (exit -15 after a complete run)."""


async def serve(
    member: str,
    directory: Path,
    host: str,
    port: int,
    *,
    links: str = "",
    kernel_shaped: bool = False,
    remove_dir: bool = False,
    tls: TlsFiles | None = None,
    background: bool = False,
) -> None:
    """Serve `directory` on host:port until SIGINT or SIGTERM (`links`: emulated shapes;
    `remove_dir`: delete `directory` on the way out, also when the parent was killed;
    `tls`: mutual TLS with the member's own certificate, as its trainer's links;
    `background`: lower this process's priority once it serves)."""
    shapes = parse_links(links)
    wire = delays_only(shapes) if kernel_shaped else shapes
    ledger, refused = SentLedger(directory), SentLedger(directory, REFUSED_FILE)
    handshakes = SentLedger(directory, HANDSHAKES_FILE)
    link_tls = LinkTls(tls, member, count=lambda r: handshakes.add(r, 1)) if tls else None
    replicator = Replicator(
        member,
        SnapshotStore(directory),
        shape=lambda peer: shape_for(wire, member, peer),
        on_sent=ledger.add,
        transport_factory=TcpTransport.secured(link_tls),
        signer=Signer(tls, member) if tls else None,
        reject=Rejections(lambda reason: refused.add(reason, 1)),
    )
    address = await replicator.start(host, port)
    print(f"serving {directory} on {address}", flush=True)
    if background:  # started at its trainer's priority; serving yields to training
        lower_this_thread()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    writers = [loop.create_task(kept.keep_written()) for kept in (ledger, refused, handshakes)]
    try:
        await stop.wait()
    finally:
        ignore_from_now(loop, signals)  # the trainer's death signal may follow its SIGTERM
        await replicator.close()
        for writer in writers:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
        if remove_dir:
            shutil.rmtree(directory, ignore_errors=True)


class Child:
    """A trainer's own replicator process, spawned (`spawn_child`); `serving()` waits
    until it serves, then `address` says where."""

    def __init__(self, process: subprocess.Popen, member: str) -> None:
        self.process = process
        self.address = ""
        self._member = member

    async def serving(self) -> Child:
        """Wait for the child's `serving` line (RuntimeError if it does not come within
        `START_TIMEOUT_S`: the child is killed)."""
        assert self.process.stdout is not None
        reading = asyncio.to_thread(self.process.stdout.readline)
        try:
            line = await asyncio.wait_for(reading, START_TIMEOUT_S)
        except TimeoutError:
            line = b""
        if not line.startswith(b"serving "):
            await self.stop(grace_s=0.0)
            raise RuntimeError(f"the replicator process of {self._member} did not start")
        self.address = line.decode().rsplit(" ", 1)[-1].strip()
        return self

    async def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Ask the child to exit (SIGTERM); kill it after `grace_s`."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.terminate()
            try:
                await asyncio.to_thread(self.process.wait, grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                await asyncio.to_thread(self.process.wait)
        if self.process.stdout is not None:
            self.process.stdout.close()


def spawn_child(
    member: str,
    directory: Path,
    host: str,
    *,
    links: str = "",
    kernel_shaped: bool = False,
    tls: TlsFiles | None = None,
) -> Child:
    """Start `python -m chaos_worker.replication.sidecar` serving `directory` on `host`
    (any port) and return at once: its interpreter starts while the trainer builds its
    model. It runs at normal priority until it serves, then at lower priority."""
    argv = [sys.executable, "-m", "chaos_worker.replication.sidecar", "--id", member, "--dir"]
    argv += [str(directory), "--listen", f"{host}:0", "--links", links]
    argv += ["--remove-dir", "--background"]  # the trainer's private directory, its priority
    if kernel_shaped:
        argv.append("--kernel-shaped")
    if tls is not None:  # paths only: the key stays in its file
        argv += ["--tls-cert", tls.cert, "--tls-key", tls.key, "--tls-ca", tls.ca]
    process = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        preexec_fn=die_with_parent(signal.SIGTERM),
    )
    return Child(process, member)


def spawn_replicator(config: WorkerConfig, directory: Path) -> Child:
    """`spawn_child` for the member `config` describes, serving `directory`."""
    host = config.listen.rpartition(":")[0]
    shaped = config.kernel_shaped
    return spawn_child(
        config.id, directory, host, links=config.links, kernel_shaped=shaped, tls=config.tls
    )


@dataclass
class EarlyReplicator:
    """A worker's private snapshot directory and its replicator process, started before
    torch is imported (`early_replicator`), so the two interpreters start side by side."""

    directory: PrivateDirectory
    child: Child

    def abandon(self) -> None:
        """The worker will not run: stop the child (it removes the directory too)."""
        with contextlib.suppress(ProcessLookupError):
            self.child.process.kill()
        self.child.process.wait()
        self.directory.remove()

    def move(self, directory: PrivateDirectory, config: WorkerConfig) -> None:
        """Serve `directory` instead (the first had no room for the snapshot slots): the
        child and the first directory go, a new child starts."""
        self.abandon()
        self.directory = directory
        self.child = spawn_replicator(config, directory.path)


def early_replicator(config: WorkerConfig) -> EarlyReplicator | None:
    """Start the replicator process of a worker that serves from a process of its own
    over a private directory (`WorkerConfig.replicator`); None for any other worker."""
    if config.snapshot_dir or config.replicator_address or config.replicator == "inline":
        return None
    directory = PrivateDirectory.create(config.id)
    return EarlyReplicator(directory, spawn_replicator(config, directory.path))


async def start_child(
    member: str,
    directory: Path,
    host: str,
    *,
    links: str = "",
    kernel_shaped: bool = False,
    tls: TlsFiles | None = None,
) -> Child:
    """`spawn_child`, then wait until it serves."""
    child = spawn_child(member, directory, host, links=links, kernel_shaped=kernel_shaped, tls=tls)
    return await child.serving()


def main(argv: list[str] | None = None) -> int:
    """`python -m chaos_worker.replication.sidecar`: the arguments of `chaos replicator`."""
    parser = argparse.ArgumentParser(prog="chaos replicator")
    add_arguments(parser)
    args = parser.parse_args(argv)
    host, port = parse_address(args.listen)
    asyncio.run(serve(args.id, Path(args.dir), host, port, **options(args)))
    exit_at_once(0)


def options(args) -> dict:
    """`serve`'s keyword arguments from parsed `add_arguments` options (ValueError if
    they do not go together)."""
    files = (args.tls_cert, args.tls_key, args.tls_ca)
    if any(files) and not all(files):
        raise ValueError("--tls-cert, --tls-key and --tls-ca go together")
    return {
        "links": args.links,
        "kernel_shaped": args.kernel_shaped,
        "remove_dir": args.remove_dir,
        "background": args.background,
        "tls": TlsFiles(cert=files[0], key=files[1], ca=files[2]) if all(files) else None,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `chaos replicator` (also `python -m chaos_worker.replication.sidecar`)."""
    parser.add_argument("--id", required=True, help="member id of the trainer beside it")
    parser.add_argument("--dir", required=True, help="the trainer's snapshot_dir")
    parser.add_argument("--listen", default="127.0.0.1:0", help="host:port (default any port)")
    parser.add_argument(
        "--links", default="", help="emulated link shapes, as `chaos run --links` (local runs)"
    )
    parser.add_argument(
        "--kernel-shaped",
        action="store_true",
        help="the rates of --links are enforced by tc (network namespaces): add only delays",
    )
    parser.add_argument("--remove-dir", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--background", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tls-cert", metavar="PEM", help="the member's certificate (mutual TLS)")
    parser.add_argument("--tls-key", metavar="PEM", help="its private key")
    parser.add_argument("--tls-ca", metavar="PEM", help="the CA bundle peers must chain to")


if __name__ == "__main__":
    sys.exit(main())
