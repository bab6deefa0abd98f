"""The autoscaler's Prometheus path against a real Prometheus: the default goodput query selects
one job's pods by the `namespace` and `pod` labels and returns one number.

Two worker exporters (`WorkerMetrics`, what a worker serves) count samples in threads, one of
them a hundred times faster and belonging to another job; Prometheus scrapes both every
second with the labels Kubernetes service discovery would add. The wait is a generous deadline
that only turns a hang into a failure; nothing asserts on speed.
"""

from __future__ import annotations

import json
import string
import threading
import time
from pathlib import Path

import pytest
from chaos_cli.local.launcher import free_ports
from chaos_operator.autoscaler import PROMETHEUS_QUERY, query_prometheus
from chaos_worker.telemetry.metrics import WorkerMetrics

from tests.tools import prometheus_binary, start_prometheus

pytestmark = pytest.mark.cluster

DEADLINE_S = 120.0


def goodput_query(namespace: str, job: str) -> str:
    return string.Template(PROMETHEUS_QUERY).substitute(namespace=namespace, job=job)


def test_default_query_measures_one_jobs_goodput(tmp_path: Path) -> None:
    prometheus_binary("prometheus")  # skip (or fail under CI) without it
    exporters = {"auto-w0": (WorkerMetrics("auto-w0"), 8), "other-w0": (WorkerMetrics("o"), 800)}
    ports = {name: m.serve("127.0.0.1", 0) for name, (m, _) in exporters.items()}
    stop = threading.Event()

    def train() -> None:  # 20 steps/s of `samples` each
        step = 0
        while not stop.wait(0.05):
            for metrics, samples in exporters.values():
                metrics.observe_step(0.05, 0.1, samples=samples, members=1, step=step)
            step += 1

    targets = [
        {"targets": [f"127.0.0.1:{port}"], "labels": {"namespace": "team-a", "pod": name}}
        for name, port in ports.items()
    ]
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [{"job_name": "chaos-workers", "static_configs": targets}],
    }))  # fmt: skip
    (web,) = free_ports(1, 0)
    base = f"http://127.0.0.1:{web}"
    trainer = threading.Thread(target=train, daemon=True)
    trainer.start()
    server = start_prometheus(config, tmp_path, web)
    try:
        deadline = time.monotonic() + DEADLINE_S
        value = other = None
        while not value or not other:  # both targets scraped twice (rate needs two points)
            assert server.poll() is None, "prometheus exited"
            assert time.monotonic() < deadline, "no goodput from Prometheus in time"
            time.sleep(0.5)
            value = query_prometheus(base, goodput_query("team-a", "auto"), timeout_s=5)
            other = query_prometheus(base, goodput_query("team-a", "other"), timeout_s=5)
        # the other job counts 100x faster: a query that mixed them would be far above it
        assert other is not None and 0 < value < other / 10, (value, other)
        assert query_prometheus(base, goodput_query("team-b", "auto"), timeout_s=5) is None
        assert query_prometheus(base, "vector(1) or vector(2)", timeout_s=5) == 1.0
        assert query_prometheus(base, "scalar(vector(3))", timeout_s=5) == 3.0
        assert query_prometheus(base, "up", timeout_s=5) is None  # two series: not one number
    finally:
        stop.set()
        server.terminate()
        server.wait(30)
        for metrics, _ in exporters.values():
            metrics.close()
    closed = f"http://127.0.0.1:{web}"
    assert query_prometheus(closed, "1", timeout_s=2) is None  # nobody listens any more
