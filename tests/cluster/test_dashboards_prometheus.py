"""Every dashboard query returns data from a real Prometheus that scrapes two workers' and an
operator's exporters labelled as the chart's PodMonitor and ServiceMonitor label them.

The exporters are the real metric classes on loopback, fed through their hooks; what is
checked is that the dashboards' selectors, labels and functions find the series (an empty
panel is a broken panel). Waits poll with a generous deadline; nothing is timed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from chaos_cli.local.launcher import free_ports
from chaos_operator.metrics import OperatorMetrics
from chaos_worker.telemetry.linktable import LinkTable
from chaos_worker.telemetry.metrics import WorkerMetrics

from tests.helmchart import CHART, load, substitute, targets
from tests.tools import prometheus_query, start_prometheus

pytestmark = pytest.mark.cluster

DEADLINE_S = 180.0
JOB_LABELS = {"namespace": "ml-a", "chaos_job": "digits"}
OPERATOR_LABELS = {"namespace": "chaos-system", "pod": "chaos-5d8f7-abcde"}


def fed_worker(member: str, peer: str) -> WorkerMetrics:
    """A worker's exporter after a few steps, events, a scale-out and link measurements."""
    metrics = WorkerMetrics(member)
    table = LinkTable()
    table.observe_rtt(member, peer, 0.002, now=10.0)
    table.observe_transfer(member, peer, 1 << 20, 0.01, now=10.0)
    metrics.update_links(table, now=10.0)
    for step in range(5):
        metrics.observe_step(0.2, 2.0 - step / 10, 32, 2, step)
    metrics.observe_event("join", 0.3)
    metrics.observe_scale_out(2.5)
    metrics.add_stall(0.1)
    metrics.add_replication_bytes(peer, "sent", 1 << 20)
    return metrics


def fed_operator() -> OperatorMetrics:
    metrics = OperatorMetrics()
    with metrics.reconciling("ml-a", "digits"):
        metrics.observe_phase("ml-a", "digits", "Running")
    metrics.pods_created.inc(2)
    metrics.pods_deleted.inc()
    return metrics


@pytest.fixture
def exporters() -> Iterator[dict[str, tuple[int, dict[str, str]]]]:
    """name -> (port on 127.0.0.1, target labels)."""
    served = {
        "w0": (fed_worker("w0", "w1"), {**JOB_LABELS, "member": "w0"}),
        "w1": (fed_worker("w1", "w0"), {**JOB_LABELS, "member": "w1"}),
        "operator": (fed_operator(), OPERATOR_LABELS),
    }
    try:
        yield {name: (m.serve("127.0.0.1", 0), labels) for name, (m, labels) in served.items()}
    finally:
        for metrics, _ in served.values():
            metrics.close()


def queries(name: str, values: dict[str, str]) -> dict[str, str]:
    """`panel title/refId` -> query of one dashboard, variables substituted."""
    board = load(CHART / "dashboards" / name)
    return {
        f"{panel['title']}/{target['refId']}": substitute(target["expr"], values, interval="1m")
        for panel, target in targets(board)
    }


def test_every_dashboard_query_returns_data(exporters, tmp_path: Path):
    config = tmp_path / "prometheus.yml"
    scrape = [
        {"targets": [f"127.0.0.1:{port}"], "labels": labels} for port, labels in exporters.values()
    ]
    config.write_text(
        json.dumps(
            {
                "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
                "scrape_configs": [{"job_name": "chaos", "static_configs": scrape}],
            }
        )
    )
    wanted = queries("chaos-job.json", {"namespace": "ml-a", "chaos_job": "digits"})
    operator = queries("chaos-operator.json", {"namespace": "chaos-system"})
    assert not set(wanted) & set(operator), "panel titles must tell the dashboards apart"
    wanted |= operator
    (port,) = free_ports(1, 0)
    base = f"http://127.0.0.1:{port}"
    server = start_prometheus(config, tmp_path, port)
    try:
        deadline = time.monotonic() + DEADLINE_S
        empty = set(wanted)
        while empty and time.monotonic() < deadline:
            assert server.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
            empty = {title for title in empty if not prometheus_query(base, wanted[title])}
            time.sleep(1.0)
        assert not empty, {title: wanted[title] for title in sorted(empty)}
        # The matrices have both directions, keyed by src and dst.
        matrix = prometheus_query(base, wanted["Link RTT (src → dst)/A"])
        assert {(r["metric"]["src"], r["metric"]["dst"]) for r in matrix} == {
            ("w0", "w1"),
            ("w1", "w0"),
        }
    finally:
        server.terminate()
        server.wait(30)
