"""WAN testbed in Linux network namespaces for `chaos run --netns` (root only).

Every worker gets a namespace of its own with one veth interface `eth0`, whose other end
(`v<i>`) is a port of the bridge `br0` in a hub namespace created for the run; nothing is
added to the root namespace. Addresses come from 198.18.0.0/15, the block RFC 2544 reserves
for benchmarking: it is never routed on the internet and rarely used on a LAN, so it cannot
shadow a real network the machine talks to (and each run has its own bridge and
namespaces, so concurrent runs may reuse the same addresses).

Rates are shaped by `tc` on each worker's `eth0` egress: an htb root qdisc with one class
per shaped destination, chosen by a u32 filter on the destination address (unshaped
destinations bypass the classes). A `--downlink` rate is a tbf on the hub side of the
worker's veth (everything that enters the worker passes there). The kernel has no netem,
so the added latency of a link stays the transport's job (`LinkShape.delay_s`).

Names are `chaos-<pid>-<start>-hub` and `chaos-<pid>-<start>-w0`…, where `<start>` is the
launcher's start time in clock ticks (from /proc/<pid>/stat): a later run removes the
namespaces of any run whose launcher is gone, even if its pid has been reused.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from chaos_worker.net.shaping import LinkShape, shape_for

PREFIX = "chaos-"
ADDRESSES = ipaddress.IPv4Network("198.18.0.0/15")
"""RFC 2544 benchmarking range: see the module docstring."""
BRIDGE = "br0"
WORKER_DEV = "eth0"
_NAME = re.compile(r"^chaos-(\d+)-(\d+)-")
_CLASS_SENT = re.compile(r"^class htb (\S+) .*\n\s*Sent (\d+) bytes", re.MULTILINE)
_TIMEOUT_S = 20
_PROBE_PORT = 7999
# Bulk-transfer endpoints for `measure_rate`: the sink times from first byte to EOF.
_SINK = """
import socket, sys, time
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
conn, _ = server.accept()
n, first = 0, None
while chunk := conn.recv(1 << 20):
    first = first or time.monotonic()
    n += len(chunk)
print(n, time.monotonic() - first, flush=True)
"""
_SOURCE = """
import socket, sys
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])))
piece, left = bytes(1 << 20), int(sys.argv[3])
while left > 0:
    conn.sendall(piece[: min(left, len(piece))])
    left -= len(piece)
conn.close()
"""


class NetnsError(Exception):
    """A namespace, link or qdisc could not be set up; the message names the command."""


_CAPS = {"CAP_NET_ADMIN": 12, "CAP_SYS_ADMIN": 21}  # veth/tc; creating namespaces


def missing_capabilities(status: str) -> list[str]:
    """Capabilities the testbed needs that `/proc/<pid>/status` text says are not effective."""
    match = re.search(r"^CapEff:\s*([0-9a-fA-F]+)$", status, re.MULTILINE)
    effective = int(match[1], 16) if match else 0
    return [name for name, bit in _CAPS.items() if not effective >> bit & 1]


def unavailable_reason() -> str | None:
    """Why this process cannot build the testbed (None: it can)."""
    if os.geteuid() != 0:
        return "not root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"no `{tool}` command"
    if not os.path.exists("/proc/self/ns/net"):
        return "no network namespace support"
    if missing := missing_capabilities(Path("/proc/self/status").read_text()):
        return f"root without {' and '.join(missing)}"
    return None


def process_start(pid: int) -> str | None:
    """Start time of `pid` in clock ticks since boot (None: no such process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]  # field 22 counted from after the comm


def run_tag(pid: int | None = None) -> str:
    """`chaos-<pid>-<start>`: the prefix of every namespace of this run."""
    pid = os.getpid() if pid is None else pid
    return f"{PREFIX}{pid}-{process_start(pid)}"


def stale_namespaces(names: list[str], start_of) -> list[str]:
    """Namespaces of runs whose launcher is gone; `start_of(pid)` as `process_start`."""
    stale = []
    for name in names:
        match = _NAME.match(name)
        if match and start_of(int(match[1])) != match[2]:
            stale.append(name)
    return stale


def _bits(rate_bytes_per_s: float) -> str:
    return f"{max(8, round(rate_bytes_per_s * 8))}bit"


@dataclass(frozen=True)
class NetnsPlan:
    """Names, addresses and the `ip`/`tc` commands (in order) that build the testbed."""

    hub: str
    namespaces: dict[str, str]  # worker -> its namespace
    addresses: dict[str, str]  # worker -> IPv4 address on the bridge
    rates: dict[tuple[str, str], float]  # (src, dst) -> shaped bytes/s
    commands: list[list[str]] = field(default_factory=list)


def plan_testbed(
    tag: str,
    workers: list[str],
    shapes: dict[str, LinkShape],
    downlinks: dict[str, float] | None = None,
) -> NetnsPlan:
    """The testbed for `workers` with link `shapes` (`shaping.parse_links`); pure."""
    if len(workers) > ADDRESSES.num_addresses - 2:
        raise NetnsError(f"too many workers for {ADDRESSES}")
    hub = f"{tag}-hub"
    namespaces = {w: f"{tag}-w{i}" for i, w in enumerate(workers)}
    addresses = {w: str(ADDRESSES.network_address + i + 1) for i, w in enumerate(workers)}
    rates = {
        (a, b): rate
        for a in workers
        for b in workers
        if a != b and (rate := shape_for(shapes, a, b).rate_bytes_per_s) is not None
    }
    commands = [
        f"ip netns add {hub}".split(),
        f"ip -n {hub} link add {BRIDGE} type bridge".split(),
        f"ip -n {hub} link set {BRIDGE} up".split(),
    ]
    for i, worker in enumerate(workers):
        ns, port, cidr = namespaces[worker], f"v{i}", f"{addresses[worker]}/{ADDRESSES.prefixlen}"
        commands += [
            f"ip netns add {ns}".split(),
            f"ip -n {ns} link set lo up".split(),
            f"ip -n {hub} link add {port} type veth peer name {WORKER_DEV} netns {ns}".split(),
            f"ip -n {hub} link set {port} master {BRIDGE} up".split(),
            f"ip -n {ns} addr add {cidr} dev {WORKER_DEV}".split(),
            f"ip -n {ns} link set {WORKER_DEV} up".split(),
        ]
        commands += _egress_commands(ns, worker, workers, addresses, rates)
        if downlinks and worker in downlinks:
            commands.append(_tbf(hub, port, downlinks[worker]))
    return NetnsPlan(hub, namespaces, addresses, rates, commands)


def _egress_commands(
    ns: str,
    src: str,
    workers: list[str],
    addresses: dict[str, str],
    rates: dict[tuple[str, str], float],
) -> list[list[str]]:
    """htb on `src`'s eth0: one class per shaped destination, selected by address."""
    shaped = [(j, dst) for j, dst in enumerate(workers) if (src, dst) in rates]
    if not shaped:
        return []
    tc = f"tc -n {ns}"
    # `default 0`: packets no filter classifies (unshaped peers, ARP) are sent unshaped.
    commands = [f"{tc} qdisc add dev {WORKER_DEV} root handle 1: htb default 0".split()]
    for j, dst in shaped:
        classid = _classid(j)
        rate = _bits(rates[(src, dst)])
        commands += [
            f"{tc} class add dev {WORKER_DEV} parent 1: classid {classid} "
            f"htb rate {rate} ceil {rate} quantum 65536".split(),
            f"{tc} filter add dev {WORKER_DEV} parent 1: protocol ip prio 1 "
            f"u32 match ip dst {addresses[dst]}/32 flowid {classid}".split(),
        ]
    return commands


def _classid(index: int) -> str:
    """htb class of the destination with this index in the worker list."""
    return f"1:{index + 1:x}"  # tc reads class minors as hex


def _tbf(ns: str, dev: str, rate_bytes_per_s: float) -> list[str]:
    """One rate for everything leaving `dev` (the hub end of a worker's veth: its downlink)."""
    burst = max(256 << 10, int(rate_bytes_per_s / 100))  # at least a few GSO packets
    rate = _bits(rate_bytes_per_s)
    return (
        f"tc -n {ns} qdisc add dev {dev} root tbf rate {rate} burst {burst} latency 200ms".split()
    )


def _run(command: list[str], timeout_s: float = _TIMEOUT_S) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"{' '.join(command)}: {exc}") from None
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or ["failed"])[-1]
        raise NetnsError(f"{' '.join(command)}: {why}")
    return done.stdout


def list_namespaces() -> list[str]:
    """Names of the named network namespaces (`ip netns list`)."""
    return [line.split()[0] for line in _run(["ip", "netns", "list"]).splitlines() if line]


def delete_namespaces(names: list[str]) -> list[str]:
    """Delete these namespaces (their veths go with them); returns the ones that failed."""
    failed = []
    for name in names:
        try:
            _run(["ip", "netns", "delete", name])
        except NetnsError:
            failed.append(name)
    return failed


def clean_stale() -> list[str]:
    """Remove the namespaces of runs whose launcher is gone; returns their names."""
    stale = stale_namespaces(list_namespaces(), process_start)
    delete_namespaces(stale)
    return stale


class NetnsTestbed:
    """A built testbed: `create` builds it (or undoes its part and raises), `close` removes it."""

    def __init__(self, plan: NetnsPlan) -> None:
        self.plan = plan
        self._created: list[str] = []

    @classmethod
    def create(
        cls,
        workers: list[str],
        shapes: dict[str, LinkShape],
        downlinks: dict[str, float] | None = None,
    ) -> NetnsTestbed:
        clean_stale()
        bed = cls(plan_testbed(run_tag(), workers, shapes, downlinks))
        try:
            for command in bed.plan.commands:
                _run(command)
                if command[:3] == ["ip", "netns", "add"]:
                    bed._created.append(command[3])
        except BaseException:
            bed.close()
            raise
        return bed

    def exec_prefix(self, worker: str) -> list[str]:
        """Prefix of a command line that runs in `worker`'s namespace."""
        return ["ip", "netns", "exec", self.plan.namespaces[worker]]

    def shaped_bytes(self) -> dict[tuple[str, str], int]:
        """Bytes each shaped link's htb class has sent so far: proof that the traffic
        between the workers went through tc."""
        workers = list(self.plan.namespaces)
        sent = {}
        for src in sorted({src for src, _ in self.plan.rates}):
            ns = self.plan.namespaces[src]
            text = _run(["tc", "-n", ns, "-s", "class", "show", "dev", WORKER_DEV])
            by_class = {classid: int(n) for classid, n in _CLASS_SENT.findall(text)}
            for j, dst in enumerate(workers):
                if (src, dst) in self.plan.rates:
                    sent[(src, dst)] = by_class.get(_classid(j), 0)
        return sent

    def close(self) -> None:
        """Delete every namespace of the run; the worker ones first (their veths go too)."""
        failed = delete_namespaces(list(reversed(self._created)))
        self._created = failed
        if failed:
            raise NetnsError(f"could not delete network namespaces {failed}")

    def measure_rate(self, src: str, dst: str, nbytes: int, timeout_s: float = 60) -> float:
        """Bytes/s of one bulk TCP transfer of `nbytes` from `src` to `dst` (kernel shaping
        only: the transport's added delay is not in this path)."""
        host, port = self.plan.addresses[dst], str(_PROBE_PORT)
        python = [sys.executable, "-c"]
        sink = subprocess.Popen(
            [*self.exec_prefix(dst), *python, _SINK, host, port], stdout=subprocess.PIPE, text=True
        )
        try:
            if sink.stdout.readline().strip() != "ready":
                raise NetnsError(f"the bulk-transfer sink in {dst}'s namespace did not start")
            _run([*self.exec_prefix(src), *python, _SOURCE, host, port, str(nbytes)], timeout_s)
            received, seconds = sink.communicate(timeout=_TIMEOUT_S)[0].split()
        finally:
            if sink.poll() is None:
                sink.kill()
            sink.wait()
        return int(received) / float(seconds)
