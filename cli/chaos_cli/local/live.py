"""Live terminal view of a local run (rich), and the closing summary."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table


class LiveView:
    """Refreshes a small table with step, loss, throughput, members and the last event."""

    def __init__(self, options, *, enabled: bool = True) -> None:
        self.options = options
        self.console = Console(stderr=True)
        self.enabled = enabled
        self._live: Live | None = None
        self._last_print = 0.0

    def __enter__(self) -> LiveView:
        if self.enabled and self.console.is_terminal:
            self._live = Live(console=self.console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)

    def update(self, job) -> None:
        if not self.enabled:
            return
        curve = job.timeline.loss_curve()
        loss = f"{curve[-1][1]:.4f}" if curve else "-"
        step = job.max_step + 1
        if self._live is not None:
            table = Table(title=f"chaos run · {self.options.example}", expand=False)
            for column in ("step", "loss", "samples/s", "members", "last event"):
                table.add_column(column)
            table.add_row(
                f"{step}/{self.options.steps}",
                loss,
                f"{job.samples_per_s:,.0f}",
                str(job.members),
                job.last_event or "-",
            )
            self._live.update(table)
        elif time.monotonic() - self._last_print > 2.0:
            self._last_print = time.monotonic()
            self.console.print(
                f"step {step}/{self.options.steps} loss {loss} members {job.members} "
                f"last event: {job.last_event or '-'}"
            )

    def summary(self, report, report_path: Path, plot_path: Path) -> None:
        table = Table(title="membership events")
        for column in ("event", "worker", "step", "handling ms", "stall s", "detail"):
            table.add_column(column)
        for event in report.events:
            table.add_row(
                event.type,
                event.worker,
                str(event.step),
                f"{event.handling_ms:.1f}",
                f"{event.incumbent_stall_s:.3f}",
                event.detail
                or ("" if event.scale_out_delay_s is None else f"{event.scale_out_delay_s:.2f}s"),
            )
        self.console.print(table)
        if any(r.shaped_bytes_per_s or r.added_rtt_s for r in report.links):
            self.console.print(_links_table(report))
        self.console.print(
            f"{report.steps} steps, final loss {report.final_loss:.4f}; "
            f"report {report_path}, plot {plot_path}"
        )


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e6:.1f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.0f}"


def _links_table(report) -> Table:
    """Shaped against measured (the src's link table at the end), one row per direction."""
    table = Table(title=f"links ({report.testbed}): shaped vs measured by src")
    for column in ("link", "shaped MB/s", "measured MB/s", "ratio", "added RTT ms", "RTT ms"):
        table.add_column(column)
    for row in report.links:
        shaped, measured = row.shaped_bytes_per_s, row.bandwidth_bytes_per_s
        ratio = f"{measured / shaped:.2f}" if shaped and measured else "-"
        table.add_row(
            f"{row.src}->{row.dst}",
            _mb(shaped),
            _mb(measured) + (" (stale)" if row.bandwidth_stale else ""),
            ratio,
            _ms(row.added_rtt_s),
            _ms(row.rtt_s),
        )
    return table
