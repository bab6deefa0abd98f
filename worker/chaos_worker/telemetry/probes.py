"""Bounded active bandwidth probes (pure, no I/O; `now` is always passed in).

Links without a fresh bandwidth figure are measured by sending a probe of `probe_bytes`
from `src` to `dst`. Two probes that share a member would compete for its NIC and measure
each other, so probes run in **rounds** in which no member takes part in two probes: the
rounds are an edge colouring of the (directed) stale links, built greedily, one maximal
matching per round, busiest members first. A round also stays within a byte budget, so
probing never floods the network; links that do not fit wait for a later round.

`schedule_probes` is the pure schedule. `LinkMonitor` is the glue a member uses: it runs the
rounds at step boundaries (every member holds the same view and the same step numbers, so
every member computes the same schedule and starts its own probes of round `r` at the same
step), keeps the probes in flight, and turns the answers into `LinkTable` figures.

A probe is a **pair** of `Ping` frames sent back to back on the FIFO link: an empty
*marker*, then one carrying `probe_bytes` of payload. The peer reads them one transfer
time apart and says so: the probe's `Pong` carries `gap_s`, the time between reading the
marker and reading the payload on the peer's clock. Every fixed delay (the link's latency,
the transport's added delay, queueing ahead of the pair) cancels out, and so does traffic
on the way back (a `Pong` queued behind the peer's own frames). Without `gap_s` the gap
between the two `Pong`s' arrivals is used, and without the marker's answer (a reconnect)
`rtt_probe - rtt_base` (the link's RTT EWMA), never less than half the probe's round trip.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from chaos_worker.telemetry.linktable import MIN_TRANSFER_BYTES, Link, LinkTable

PROBE_BYTES = 1024 * 1024
ROUND_BUDGET_BYTES = 4 * 1024 * 1024
STEPS_PER_ROUND = 2
PROBE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Probe:
    """Send `nbytes` from `src` to `dst` and time the answer."""

    src: str
    dst: str
    nbytes: int


def schedule_probes(
    links: Iterable[Link],
    *,
    probe_bytes: int = PROBE_BYTES,
    round_budget_bytes: int = ROUND_BUDGET_BYTES,
) -> list[list[Probe]]:
    """Rounds of probes: every link exactly once, no member twice in a round, within budget.

    `links` are directed `(src, dst)` pairs (duplicates are probed once). Deterministic:
    the same set of links gives the same rounds whatever their order.
    """
    if probe_bytes < MIN_TRANSFER_BYTES:
        raise ValueError(
            f"probe_bytes {probe_bytes} is below {MIN_TRANSFER_BYTES}: the link table "
            "would ignore the measurement"
        )
    if round_budget_bytes < probe_bytes:
        raise ValueError("round_budget_bytes must hold at least one probe")
    todo = set()
    for src, dst in links:
        if src == dst:
            raise ValueError(f"link {src!r} -> {dst!r} is a loop")
        todo.add((src, dst))
    per_round = round_budget_bytes // probe_bytes
    rounds: list[list[Probe]] = []
    while todo:
        degree: dict[str, int] = {}
        for src, dst in todo:
            degree[src] = degree.get(src, 0) + 1
            degree[dst] = degree.get(dst, 0) + 1
        order = sorted(todo, key=lambda link: (-max(degree[link[0]], degree[link[1]]), link))
        busy: set[str] = set()
        this_round: list[Probe] = []
        for src, dst in order:
            if len(this_round) == per_round:
                break
            if src in busy or dst in busy:
                continue
            busy.update((src, dst))
            this_round.append(Probe(src, dst, probe_bytes))
            todo.discard((src, dst))
        rounds.append(sorted(this_round, key=lambda p: (p.src, p.dst)))
    return rounds


def directed(
    overlay_keys: Iterable[str], down: Iterable[str] = (), members: Iterable[str] | None = None
) -> list[Link]:
    """Both directions of every live overlay link `"a|b"` of a view (between `members`)."""
    dead = set(down)
    alive = None if members is None else set(members)
    links = []
    for key in overlay_keys:
        a, _, b = key.partition("|")
        if key in dead or (alive is not None and not {a, b} <= alive):
            continue
        links += [(a, b), (b, a)]
    return sorted(links)


class LinkMonitor:
    """One member's measurements: pongs and probes into a `LinkTable` (see module doc)."""

    def __init__(
        self,
        me: str,
        table: LinkTable | None = None,
        *,
        probe_bytes: int = PROBE_BYTES,
        round_budget_bytes: int = ROUND_BUDGET_BYTES,
        steps_per_round: int = STEPS_PER_ROUND,
        timeout_s: float = PROBE_TIMEOUT_S,
    ) -> None:
        if steps_per_round < 1:
            raise ValueError("steps_per_round must be at least 1")
        self.me = me
        self.table = table if table is not None else LinkTable()
        self.probe_bytes = probe_bytes
        self.round_budget_bytes = round_budget_bytes
        self.steps_per_round = steps_per_round
        self.timeout_s = timeout_s
        self._schedule_for: frozenset[Link] | None = None
        self._rounds: list[list[Probe]] = []
        self._in_flight: dict[tuple[str, float], Probe] = {}
        self._started: dict[tuple[str, float], float] = {}
        self._markers: dict[tuple[str, float], tuple[str, float]] = {}  # marker -> its probe
        self._marker_back: dict[tuple[str, float], float] = {}  # probe -> its marker's Pong

    def rounds(self, links: Iterable[Link]) -> list[list[Probe]]:
        """The schedule over `links` (all live links of the view), cached per link set."""
        key = frozenset(links)
        if key != self._schedule_for:
            self._schedule_for = key
            self._rounds = schedule_probes(
                key, probe_bytes=self.probe_bytes, round_budget_bytes=self.round_budget_bytes
            )
        return self._rounds

    def due(self, links: Iterable[Link], step: int, now: float) -> list[Probe]:
        """Probes this member should start at the boundary before `step`.

        The schedule is built over every live link (the same everywhere), so members agree
        on the rounds whatever each one knows; each member then starts only its own probes
        of the round, only for links without a fresh figure, and never while a probe of its
        own is still in flight.
        """
        self._expire(now)
        rounds = self.rounds(links)
        if not rounds or step % self.steps_per_round:
            return []
        if any(probe.src == self.me for probe in self._in_flight.values()):
            return []
        current = rounds[(step // self.steps_per_round) % len(rounds)]
        return [
            p
            for p in current
            if p.src == self.me and self.table.bandwidth_of(p.src, p.dst, now) is None
        ]

    def start(self, probe: Probe, now: float) -> float:
        """Record that `probe` leaves now; returns the `sent_at` to put in its `Ping`."""
        sent_at = now
        while (probe.dst, sent_at) in self._in_flight:
            sent_at = math.nextafter(sent_at, math.inf)
        self._in_flight[(probe.dst, sent_at)] = probe
        self._started[(probe.dst, sent_at)] = now
        return sent_at

    def start_pair(self, probe: Probe, now: float) -> tuple[float, float]:
        """`start` plus its marker: the `sent_at` of the empty marker `Ping`, to be sent
        first, and of the probe's `Ping`, to follow it at once on the same link."""
        sent_at = self.start(probe, now)
        marker = math.nextafter(sent_at, -math.inf)
        while (probe.dst, marker) in self._in_flight or (probe.dst, marker) in self._markers:
            marker = math.nextafter(marker, -math.inf)
        self._markers[(probe.dst, marker)] = (probe.dst, sent_at)
        return marker, sent_at

    def on_pong(self, peer: str, echo: float, now: float, *, gap_s: float | None = None) -> None:
        """A `Pong` from `peer` echoing `echo`: an RTT sample, or a probe's answer (`gap_s`:
        the peer's time between reading the pair's marker and the probe, when it sent it)."""
        rtt = now - echo
        if not math.isfinite(rtt) or rtt < 0:
            return
        key = (peer, echo)
        if (probe_key := self._markers.pop(key, None)) is not None:
            if probe_key in self._in_flight:
                self._marker_back[probe_key] = now
            self.table.observe_rtt(self.me, peer, rtt, now)  # an empty Ping: a clean RTT
            return
        probe = self._in_flight.pop(key, None)
        self._started.pop(key, None)
        marker_back = self._marker_back.pop(key, None)
        if probe is None:
            self.table.observe_rtt(self.me, peer, rtt, now)
            return
        if gap_s is not None and gap_s > 0:
            transfer_s = gap_s  # timed where the bytes arrive: the way back plays no part
        elif marker_back is not None and now > marker_back:
            transfer_s = now - marker_back
        else:
            base = self.table.rtt(self.me, peer, now)
            base_s = 0.0 if base is None or base.stale else base.value
            transfer_s = max(rtt - base_s, rtt / 2)
        if transfer_s > 0:
            self.table.observe_transfer(self.me, peer, probe.nbytes, transfer_s, now)

    def in_flight(self) -> list[Probe]:
        return list(self._in_flight.values())

    def _expire(self, now: float) -> None:
        """Forget probes never answered (link down, peer gone) after `timeout_s`."""
        for key, started in list(self._started.items()):
            if now - started > self.timeout_s:
                del self._started[key]
                self._in_flight.pop(key, None)
                self._marker_back.pop(key, None)
        for marker, probe_key in list(self._markers.items()):
            if probe_key not in self._in_flight:
                del self._markers[marker]
