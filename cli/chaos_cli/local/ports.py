"""Addresses of a local run: ports for its members on 127.0.0.1, and its control socket."""

from __future__ import annotations

import collections
import os
import random
import socket
import tempfile
from pathlib import Path

from chaos_cli.local.errors import LaunchError


def free_ports(count: int, base: int) -> list[int]:
    """`count` ports to listen on: `base`, `base+1`, ... checked free, or any free ones
    below the kernel's ephemeral range (`_unclaimed_port`)."""
    ports: list[int] = []
    for i in range(count):
        port = base + i if base else _unclaimed_port(set(ports))
        if not _bindable(port):
            raise LaunchError(f"port {port} on 127.0.0.1 is taken")
        ports.append(port)
    return ports


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _unclaimed_port(taken: set[int]) -> int:
    """A free port below the ephemeral range, and none handed out lately in this process.

    A port is free between this check and the worker's own bind; one from the ephemeral
    range (a bind to port 0) could meanwhile become the source port of any outgoing
    connection on the machine, and the worker then fails with "port is taken". Two draws
    before either port is bound (a member's address, then a joiner's or a metrics port; two
    operators of a test) could also pick the same port: `_HANDED_OUT` keeps them apart."""
    low, high = LOWEST_PORT, _ephemeral_low() - 1
    for _ in range(1000):
        port = random.randint(low, max(low, high))
        if port not in taken and port not in _HANDED_OUT and _bindable(port):
            _HANDED_OUT.append(port)
            return port
    raise LaunchError(f"no free port on 127.0.0.1 in {low}..{high}")


_HANDED_OUT: collections.deque[int] = collections.deque(maxlen=1024)
"""The ports `_unclaimed_port` gave out last in this process, not given out again."""

LOWEST_PORT = 20000
"""Ports picked for members lie from here to below the ephemeral range."""


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (Linux; 32768 elsewhere)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


UNIX_PATH_MAX = 107
"""Bytes of a Unix socket's path (`sun_path` holds 108 with the terminating NUL)."""


def control_socket(run_dir: Path) -> Path:
    """Where the run's control socket listens: `control.sock` in `run_dir`, or, when that
    path is too long for a Unix socket (a deep TMPDIR), in a private directory of its own
    under /tmp (mode 0700, as `run_dir`), which the caller removes with the run."""
    path = run_dir / "control.sock"
    if len(os.fsencode(path)) <= UNIX_PATH_MAX:
        return path
    return Path(tempfile.mkdtemp(prefix="chaos-ctl-", dir="/tmp")) / "control.sock"
