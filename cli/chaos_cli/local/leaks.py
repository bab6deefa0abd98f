"""What a finished local run may have left behind on this machine (Linux `/proc`).

A run's worker processes hold its run directory in their command line (`--config
RUN_DIR/wK.json`); each starts a replicator child that serves a snapshot directory
`/dev/shm/chaos-wK-*` and removes it when it stops, also when its worker was killed.
`Watch` notes those children while the run goes on (their directories cannot be told
from another run's afterwards); `leftovers` then names every process, listening socket
and snapshot directory of the run still there.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

SHM = Path("/dev/shm")
SHM_PREFIX = "chaos-"
SIDECAR = "chaos_worker.replication.sidecar"
WATCH_EVERY_S = 0.5
SETTLE_S = 5.0
"""How long processes and directories get to go after the run returns (a replicator
notices its worker's death by a signal and removes its directory on the way out)."""


def shm_entries() -> set[str]:
    """Names of the `/dev/shm/chaos-*` entries now."""
    with contextlib.suppress(OSError):
        return {p.name for p in SHM.iterdir() if p.name.startswith(SHM_PREFIX)}
    return set()


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every live, non-zombie process we can read."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if fields and fields[0] != "Z":
            found[int(entry)] = (
                int(fields[1]),
                cmdline.replace(b"\0", b" ").decode(errors="replace"),
            )
    return found


@dataclass
class Watch:
    """The replicator children of a run's workers, noted as the run goes on."""

    workers: set[int] = field(default_factory=set)
    children: dict[int, str] = field(default_factory=dict)  # pid -> its command line
    directories: set[str] = field(default_factory=set)  # their /dev/shm entry names
    _last: float = 0.0

    def tick(self, pids: set[int]) -> None:
        """Note the replicators of the worker processes `pids` (at most every
        `WATCH_EVERY_S`)."""
        now = time.monotonic()
        if now - self._last < WATCH_EVERY_S:
            return
        self._last = now
        self.workers |= pids
        for pid, (parent, cmdline) in _processes().items():
            if parent in self.workers and SIDECAR in cmdline:
                self.children[pid] = cmdline
                words = cmdline.split()
                if "--dir" in words[:-1]:
                    path = Path(words[words.index("--dir") + 1])
                    if path.parent == SHM:
                        self.directories.add(path.name)


def leftovers(
    run_dir: str,
    workers: dict[int, str],
    addresses: dict[str, str],
    watch: Watch,
    shm_before: set[str],
    settle_s: float = SETTLE_S,
) -> tuple[list[str], dict]:
    """What the run left, after up to `settle_s` for it to go: (problems, details).

    `workers`: pid -> name of the run's worker processes; `addresses`: name -> the
    host:port it listened on; `shm_before`: `shm_entries()` before the run.
    """
    deadline = time.monotonic() + settle_s
    while True:
        problems, details = _look(run_dir, workers, addresses, watch, shm_before)
        if not problems or time.monotonic() >= deadline:
            return problems, details
        time.sleep(0.2)


def _look(
    run_dir: str,
    workers: dict[int, str],
    addresses: dict[str, str],
    watch: Watch,
    shm_before: set[str],
) -> tuple[list[str], dict]:
    problems = []
    live = _processes()
    marks = [f"{run_dir}/", *(str(SHM / d) for d in watch.directories)]
    for pid, (_, cmdline) in sorted(live.items()):
        # a pid of the run still there, unless reused (another command line)
        held = watch.children.get(pid) == cmdline
        if held or any(mark in cmdline for mark in marks):
            who = workers.get(pid, "replicator" if SIDECAR in cmdline else "process")
            problems.append(f"{who} (pid {pid}) still runs: {cmdline.strip()[:160]}")
    reused = {}
    for name, address in sorted(addresses.items()):
        if not _accepts(address):
            continue
        owner = _listener(address, live)
        if owner is not None and not any(m in live[owner][1] for m in marks):
            reused[name] = f"{address} now served by pid {owner}: {live[owner][1][:80]}"
            continue
        problems.append(f"{name}'s address {address} still accepts connections")
    new = shm_entries() - shm_before
    mine = sorted(new & watch.directories)
    problems += [f"{SHM / d} was left behind" for d in mine]
    details = {
        "worker_processes": len(workers),
        "replicators": len(watch.children),
        "snapshot_directories": len(watch.directories),
        "addresses": len(addresses),
        "ports_reused": reused,
        "shm_new_not_ours": sorted(new - watch.directories),
    }
    return problems, details


def _accepts(address: str) -> bool:
    """Something listens at host:port (a connection is accepted within 0.2 s)."""
    host, _, port = address.rpartition(":")
    with (
        contextlib.suppress(OSError, ValueError),
        socket.create_connection((host, int(port)), timeout=0.2),
    ):
        return True
    return False


def _listener(address: str, live: dict[int, tuple[int, str]]) -> int | None:
    """The pid of the process listening at host:port, if this user can see it."""
    port = int(address.rpartition(":")[2])
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and int(cols[1].rpartition(":")[2], 16) == port:
                    inodes.add(cols[9])
    for pid in live:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:[") and link[8:-1] in inodes:
                        return pid
    return None
