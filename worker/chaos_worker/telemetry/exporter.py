"""The Prometheus exporter base shared by the worker's and the operator's metrics.

A registry of its own (never the global one), its text exposition, `chaos_build_info`, and
an optional `/metrics` server. The operator imports only this module of the worker's telemetry.
"""

from __future__ import annotations

import threading
from importlib import metadata

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.exposition import start_http_server

# 1 ms .. 60 s, roughly x2.5 per bucket.
STEP_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip


def chaos_version() -> str:
    """The installed `chaos-train` version, or `unknown` when running from a bare tree."""
    try:
        return metadata.version("chaos-train")
    except metadata.PackageNotFoundError:
        return "unknown"


class Exporter:
    """A registry of its own with its text exposition and an optional `/metrics` server.

    The base of the worker's and the operator's metrics: the operator imports this module
    (and no other telemetry module) from the worker.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._server = None
        self._thread: threading.Thread | None = None

    def add_build_info(self, component: str, version: str | None) -> None:
        """`chaos_build_info{version}` = 1, the installed version unless `version` is given."""
        Gauge(
            "chaos_build_info",
            f"Version of the chaos-train {component} (always 1).",
            ["version"],
            registry=self.registry,
        ).labels(version or chaos_version()).set(1)

    def render(self) -> bytes:
        """The text exposition of every metric (what a scrape gets)."""
        return generate_latest(self.registry)

    def serve(self, host: str, port: int) -> int:
        """Serve `/metrics` on `host:port` (0: any free port) in a daemon thread; the port."""
        if self._server is not None:
            raise RuntimeError("metrics are already served")
        started = start_http_server(port, addr=host, registry=self.registry)
        if not started:  # prometheus-client < 0.20 returns nothing
            raise RuntimeError("prometheus-client >= 0.20 is required to serve metrics")
        self._server, self._thread = started
        return int(self._server.server_port)

    def close(self) -> None:
        """Stop serving (idempotent)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
