"""The operator's Prometheus metrics: names, values, exposition lint (promtool), serving, CLI."""

from __future__ import annotations

import subprocess
import sys
import urllib.request

import pytest
from chaos_operator.metrics import PHASES, OperatorMetrics
from kubernetes.client.exceptions import ApiException
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from tests.tools import REPO, assert_promtool_accepts

pytestmark = pytest.mark.unit

NAMES = [
    "chaos_operator_reconcile_total",
    "chaos_operator_reconcile_duration_seconds",
    "chaos_operator_pods_created_total",
    "chaos_operator_pods_deleted_total",
    "chaos_operator_jobs",
    "chaos_build_info",
]


def value(m: OperatorMetrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def busy_metrics() -> OperatorMetrics:
    """Metrics after a few reconciles of every result."""
    m = OperatorMetrics(version="1.2.3")
    for name, phase in (("a", "Running"), ("b", "Scaling"), ("c", None)):
        with m.reconciling("ns", name):
            m.observe_phase("ns", name, phase)
    with m.reconciling("ns", "gone") as rec:
        rec.gone = True
    for exc in (ApiException(status=409), ApiException(status=500), RuntimeError("bug")):
        with pytest.raises(type(exc)), m.reconciling("ns", "a"):
            raise exc
    m.pods_created.inc(3)
    m.pods_deleted.inc()
    return m


def test_every_metric_has_a_name_help_and_type_before_any_reconcile():
    text = OperatorMetrics().render().decode()
    for name in NAMES:
        base = name.removesuffix("_total")
        assert f"# HELP {base}" in text, name
        assert f"# TYPE {base}" in text, name
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert {s.labels["result"] for s in families["chaos_operator_reconcile"].samples} >= {
        "ok",
        "gone",
        "conflict",
        "error",
    }


def test_reconciles_are_counted_by_result_and_timed():
    m = busy_metrics()
    assert value(m, "chaos_operator_reconcile_total", result="ok") == 3
    assert value(m, "chaos_operator_reconcile_total", result="gone") == 1
    assert value(m, "chaos_operator_reconcile_total", result="conflict") == 1
    assert value(m, "chaos_operator_reconcile_total", result="error") == 2
    assert value(m, "chaos_operator_reconcile_duration_seconds_count") == 7
    assert value(m, "chaos_operator_pods_created_total") == 3
    assert value(m, "chaos_operator_pods_deleted_total") == 1
    assert value(m, "chaos_build_info", version="1.2.3") == 1


def test_jobs_by_phase_lists_every_phase_and_forgets_deleted_jobs():
    m = busy_metrics()
    counts = {p: value(m, "chaos_operator_jobs", phase=p) for p in PHASES}
    assert counts == {p: {"Running": 1, "Scaling": 1, "Pending": 1}.get(p, 0) for p in PHASES}
    m.observe_phase("ns", "a", "Recovering")  # a job changes phase: counted once
    assert value(m, "chaos_operator_jobs", phase="Running") == 0
    assert value(m, "chaos_operator_jobs", phase="Recovering") == 1
    with m.reconciling("ns", "b") as rec:
        rec.gone = True
    assert value(m, "chaos_operator_jobs", phase="Scaling") == 0
    m.keep_jobs([("ns", "a")])  # a resync listed only a: c was deleted meanwhile
    assert sum(value(m, "chaos_operator_jobs", phase=p) for p in PHASES) == 1


def test_each_instance_has_its_own_registry():
    a, b = OperatorMetrics(), OperatorMetrics()
    a.pods_created.inc()
    assert value(b, "chaos_operator_pods_created_total") == 0
    assert REGISTRY.get_sample_value("chaos_operator_pods_created_total") is None


@pytest.mark.parametrize("make", [OperatorMetrics, busy_metrics])
def test_promtool_accepts_the_exposition(make):
    assert_promtool_accepts(make().render())


def test_serve_on_port_zero():
    m = busy_metrics()
    port = m.serve("127.0.0.1", 0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
            body = reply.read()
        assert b"chaos_operator_pods_created_total 3.0" in body
    finally:
        m.close()


@pytest.mark.parametrize("port", ["70000", "-1", "x"])
def test_operator_rejects_a_bad_metrics_port_in_one_line(port):
    result = subprocess.run(
        [sys.executable, "-m", "chaos_cli.main", "operator", "-n", "x", "--metrics-port", port],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 or "usage:" in result.stderr
    assert "metrics-port" in result.stderr
    assert "Traceback" not in result.stderr
