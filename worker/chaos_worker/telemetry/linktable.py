"""Link and compute measurements of one member: RTT, bandwidth and speed (pure, no I/O).

A `LinkTable` keeps, per directed link `(src, dst)`, two figures:

* **RTT** in seconds: an EWMA of ping/pong round trips on the link;
* **bandwidth** in bytes/s: an EWMA of completed transfers `bytes / seconds` from `src` to
  `dst`. Transfers smaller than `min_transfer_bytes` (64 KiB by default) are ignored: their
  time is dominated by latency and scheduling, not by the link's throughput, so they would
  drag the estimate down by orders of magnitude.

and, per member, the **speed** in samples/s: an EWMA of `samples / seconds` over its steps.

Every figure remembers when it was last measured (`now` is always passed in; the table
never reads a clock). A figure older than `max_age_s` is *stale*: readings report it with
`stale=True` and its age, and the planner-facing helpers (`bandwidth_of`,
`bandwidths_from`, `stale_links`) treat it as missing instead of silently using it.

Tables can be shared with neighbours: `share(now)` gives a plain dict with *ages* (clocks of
different hosts are not comparable, ages are), and `merge(shared, now)` takes in every entry
whose measurement is newer than the one held here. `plausible` bounds what a figure may be,
so that neither side ever takes in a value that no real link has.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

MIN_TRANSFER_BYTES = 64 * 1024
DEFAULT_ALPHA = 0.3
DEFAULT_MAX_AGE_S = 60.0

MAX_FIGURE: dict[str, float] = {"rtt": 600.0, "bandwidth": 1e12}
"""Largest plausible figure per kind: a 10-minute round trip, 1 TB/s."""
MAX_AGE_S = 86400.0
MAX_SAMPLES = 1e9

Kind = Literal["rtt", "bandwidth"]
Link = tuple[str, str]
KINDS: tuple[Kind, ...] = ("rtt", "bandwidth")


@dataclass(frozen=True)
class Figure:
    """An EWMA and when (on the holder's clock) it was last updated."""

    value: float
    measured_at: float
    samples: int = 1


@dataclass(frozen=True)
class Reading:
    """A figure as seen at some moment: its value, its age and whether it is stale."""

    value: float
    age_s: float
    stale: bool
    samples: int


@dataclass(frozen=True)
class LinkReading:
    """One row of `LinkTable.readings`: a figure of one directed link."""

    src: str
    dst: str
    kind: Kind
    value: float
    age_s: float
    stale: bool


def _check(name: str, value: float, *, positive: bool = False) -> None:
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(
            f"{name} must be a finite {'positive' if positive else 'non-negative'} "
            f"number, got {value!r}"
        )


def plausible(kind: str, value: float, age_s: float, samples: float) -> bool:
    """Whether a shared entry `[value, age_s, samples]` of `kind` can describe a real link:
    finite, non-negative, within `MAX_FIGURE`, an age under a day, at least one sample."""
    numbers = (value, age_s, samples)
    if kind not in MAX_FIGURE or not all(isinstance(x, int | float) for x in numbers):
        return False
    if not all(math.isfinite(x) for x in numbers):
        return False
    return (
        0 <= value <= MAX_FIGURE[kind] and 0 <= age_s <= MAX_AGE_S and 1 <= samples <= MAX_SAMPLES
    )


def ewma(old: Figure | None, sample: float, now: float, alpha: float) -> Figure:
    """Fold `sample` into `old` (the first sample is taken as is)."""
    if old is None:
        return Figure(sample, now, 1)
    return Figure(
        alpha * sample + (1 - alpha) * old.value, max(now, old.measured_at), old.samples + 1
    )


class LinkTable:
    """RTT and bandwidth per directed link, speed per member; see the module docstring."""

    def __init__(
        self,
        *,
        alpha: float = DEFAULT_ALPHA,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        min_transfer_bytes: int = MIN_TRANSFER_BYTES,
    ) -> None:
        if not 0 < alpha <= 1:
            raise ValueError("alpha must be in (0, 1]")
        _check("max_age_s", max_age_s, positive=True)
        self.alpha = alpha
        self.max_age_s = max_age_s
        self.min_transfer_bytes = min_transfer_bytes
        self._figures: dict[Kind, dict[Link, Figure]] = {"rtt": {}, "bandwidth": {}}
        self._speeds: dict[str, Figure] = {}

    # ------------------------------------------------------------------ measuring

    def observe_rtt(self, src: str, dst: str, seconds: float, now: float) -> None:
        """One ping/pong round trip from `src` to `dst` and back took `seconds`."""
        _check("rtt", seconds)
        self._fold("rtt", (src, dst), seconds, now)

    def observe_transfer(self, src: str, dst: str, nbytes: int, seconds: float, now: float) -> bool:
        """A transfer of `nbytes` from `src` to `dst` completed in `seconds`.

        Returns False (and changes nothing) when the transfer is below `min_transfer_bytes`.
        """
        _check("nbytes", nbytes)
        if nbytes < self.min_transfer_bytes:
            return False
        _check("seconds", seconds, positive=True)
        self._fold("bandwidth", (src, dst), nbytes / seconds, now)
        return True

    def observe_step(self, member: str, samples: int, seconds: float, now: float) -> bool:
        """`member` computed `samples` samples in `seconds`; False if there was nothing to time."""
        _check("samples", samples)
        _check("seconds", seconds)
        if samples == 0 or seconds == 0:
            return False
        self._speeds[member] = ewma(self._speeds.get(member), samples / seconds, now, self.alpha)
        return True

    def _fold(self, kind: Kind, link: Link, sample: float, now: float) -> None:
        figures = self._figures[kind]
        figures[link] = ewma(figures.get(link), sample, now, self.alpha)

    def forget(self, member: str) -> None:
        """Drop every figure that involves `member` (it left the job)."""
        for figures in self._figures.values():
            for link in [link for link in figures if member in link]:
                del figures[link]
        self._speeds.pop(member, None)

    # ------------------------------------------------------------------ reading

    def _read(self, figure: Figure | None, now: float) -> Reading | None:
        if figure is None:
            return None
        age = max(0.0, now - figure.measured_at)
        return Reading(figure.value, age, age > self.max_age_s, figure.samples)

    def rtt(self, src: str, dst: str, now: float) -> Reading | None:
        return self._read(self._figures["rtt"].get((src, dst)), now)

    def bandwidth(self, src: str, dst: str, now: float) -> Reading | None:
        return self._read(self._figures["bandwidth"].get((src, dst)), now)

    def speed(self, member: str, now: float) -> Reading | None:
        return self._read(self._speeds.get(member), now)

    def bandwidth_of(self, src: str, dst: str, now: float) -> float | None:
        """The fresh bandwidth of `src -> dst` in bytes/s, or None if unknown or stale."""
        reading = self.bandwidth(src, dst, now)
        return None if reading is None or reading.stale else reading.value

    def bandwidths_from(
        self, src_ids: list[str], dst: str, now: float, default: float
    ) -> dict[str, float]:
        """For the planner: bytes/s of `src -> dst` per source, `default` where not fresh."""
        result = {}
        for src in src_ids:
            value = self.bandwidth_of(src, dst, now)
            result[src] = default if value is None else value
        return result

    def speeds(self, members: list[str], now: float, default: float) -> dict[str, float]:
        """Fresh samples/s per member, `default` where unknown or stale."""
        result = {}
        for member in members:
            reading = self.speed(member, now)
            result[member] = default if reading is None or reading.stale else reading.value
        return result

    def stale_links(self, links: list[Link], now: float) -> list[Link]:
        """Those of `links` without a fresh bandwidth figure, in the given order."""
        return [link for link in links if self.bandwidth_of(*link, now) is None]

    def readings(self, now: float) -> list[LinkReading]:
        """Every link figure held, stale ones included (flagged), sorted."""
        rows = []
        for kind in KINDS:
            for (src, dst), figure in self._figures[kind].items():
                reading = self._read(figure, now)
                rows.append(
                    LinkReading(src, dst, kind, reading.value, reading.age_s, reading.stale)
                )
        return sorted(rows, key=lambda r: (r.src, r.dst, r.kind))

    def as_dict(self, now: float) -> dict[str, dict[str, dict[str, float | bool]]]:
        """Plain JSON-able export: `{"src|dst": {"rtt": {...}, "bandwidth": {...}}}`."""
        out: dict[str, dict[str, dict[str, float | bool]]] = {}
        for row in self.readings(now):
            out.setdefault(f"{row.src}|{row.dst}", {})[row.kind] = {
                "value": row.value,
                "age_s": row.age_s,
                "stale": row.stale,
            }
        return out

    # ------------------------------------------------------------------ sharing

    def share(
        self, now: float, *, limit: int | None = None, fresh_only: bool = False
    ) -> dict[str, dict[str, list[float]]]:
        """This table for a neighbour: `{kind: {"src|dst": [value, age_s, samples]}}`.

        Only plausible figures are shared; with `fresh_only` no stale ones; with `limit`, at
        most that many entries, the most recently measured first.
        """
        rows = []
        for kind in KINDS:
            for (src, dst), f in self._figures[kind].items():
                entry = [f.value, max(0.0, now - f.measured_at), float(f.samples)]
                if not plausible(kind, *entry) or (fresh_only and entry[1] > self.max_age_s):
                    continue
                rows.append((entry[1], kind, f"{src}|{dst}", entry))
        rows.sort(key=lambda row: row[:3])
        out: dict[str, dict[str, list[float]]] = {kind: {} for kind in KINDS}
        for _, kind, key, entry in rows[:limit]:
            out[kind][key] = entry
        return out

    def merge(
        self,
        shared: dict[str, dict[str, list[float]]],
        now: float,
        accept: Callable[[str, str], bool] | None = None,
    ) -> int:
        """Take in a neighbour's `share()`; per entry the newer measurement wins.

        Ages are turned into times on this table's clock (`now - age`). Malformed or
        implausible entries raise ValueError (nothing is taken then); links for which
        `accept(src, dst)` is False are skipped. Returns how many entries were taken.
        """
        parsed: list[tuple[Kind, Link, Figure]] = []
        for kind, entries in shared.items():
            if kind not in self._figures:
                raise ValueError(f"unknown figure kind {kind!r}")
            for key, entry in entries.items():
                src, sep, dst = key.partition("|")
                if not sep or not src or not dst or src == dst or len(entry) != 3:
                    raise ValueError(f"malformed link entry {key!r}: {entry!r}")
                if not plausible(kind, *entry):
                    raise ValueError(f"implausible {kind} of {key}: {list(entry)!r}")
                value, age, samples = entry
                if accept is None or accept(src, dst):
                    parsed.append((kind, (src, dst), Figure(float(value), now - age, int(samples))))
        taken = 0
        for kind, link, theirs in parsed:
            mine = self._figures[kind].get(link)
            if mine is None or theirs.measured_at > mine.measured_at:
                self._figures[kind][link] = theirs
                taken += 1
        return taken
