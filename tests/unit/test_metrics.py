"""The worker's Prometheus metrics: names, values, exposition lint (promtool) and serving."""

from __future__ import annotations

import urllib.request

import pytest
from chaos_worker.telemetry.linktable import LinkTable
from chaos_worker.telemetry.metrics import WorkerMetrics
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from tests.tools import assert_promtool_accepts

pytestmark = pytest.mark.unit

NAMES = [
    "chaos_link_bandwidth_bytes_per_second",
    "chaos_link_rtt_seconds",
    "chaos_link_measurement_age_seconds",
    "chaos_step_duration_seconds",
    "chaos_train_loss",
    "chaos_train_samples_total",
    "chaos_train_steps_total",
    "chaos_members",
    "chaos_membership_events_total",
    "chaos_event_handling_seconds",
    "chaos_scale_out_duration_seconds",
    "chaos_incumbent_stall_seconds_total",
    "chaos_replication_bytes_total",
    "chaos_build_info",
    "chaos_member_info",
]
MiB = 1 << 20


def busy_metrics() -> WorkerMetrics:
    """Metrics with every hook called at least once."""
    metrics = WorkerMetrics("w0", version="1.2.3")
    table = LinkTable(max_age_s=30.0)
    table.observe_rtt("w0", "w1", 0.002, now=100.0)
    table.observe_transfer("w0", "w1", 8 * MiB, 0.5, now=100.0)
    table.observe_rtt("w0", "w2", 0.003, now=60.0)  # stale at 100
    table.observe_rtt("w1", "w2", 0.004, now=100.0)  # merged from a neighbour: not ours
    metrics.update_links(table, now=100.0)
    metrics.observe_step(0.25, 1.5, 20, 3)
    metrics.observe_step(0.35, 1.25, 22, 3)
    metrics.observe_event("crash", 0.12)
    metrics.observe_event("join", 0.5)
    metrics.observe_event("join", 0.7)
    metrics.observe_scale_out(3.2)
    metrics.add_stall(0.4)
    metrics.add_replication_bytes("w1", "sent", 1000)
    metrics.add_replication_bytes("w2", "received", 2000)
    return metrics


def value(metrics: WorkerMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_every_metric_has_a_name_help_and_type_even_before_any_observation():
    text = WorkerMetrics("w0").render().decode()
    for name in NAMES:
        assert f"# HELP {name} " in text, name
        assert f"# TYPE {name} " in text, name


def test_render_contains_every_metric_with_values():
    text = busy_metrics().render().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in NAMES:
        base = name.removesuffix("_total")
        assert base in families, name
        assert families[base].documentation, f"{name} has no help text"


def test_values_follow_the_hooks():
    m = busy_metrics()
    assert value(m, "chaos_train_samples_total") == 42
    assert value(m, "chaos_train_steps_total") == 2
    assert value(m, "chaos_train_loss") == 1.25
    assert value(m, "chaos_members") == 3
    assert value(m, "chaos_step_duration_seconds_count") == 2
    assert value(m, "chaos_step_duration_seconds_sum") == pytest.approx(0.6)
    assert value(m, "chaos_membership_events_total", type="join") == 2
    assert value(m, "chaos_membership_events_total", type="crash") == 1
    assert value(m, "chaos_event_handling_seconds_count", type="join") == 2
    assert value(m, "chaos_event_handling_seconds_bucket", type="join", le="0.5") == 1
    assert value(m, "chaos_scale_out_duration_seconds_sum") == pytest.approx(3.2)
    assert value(m, "chaos_incumbent_stall_seconds_total") == pytest.approx(0.4)
    assert value(m, "chaos_replication_bytes_total", peer="w1", direction="sent") == 1000
    assert value(m, "chaos_replication_bytes_total", peer="w2", direction="received") == 2000
    assert value(m, "chaos_build_info", version="1.2.3") == 1
    assert value(m, "chaos_member_info", member="w0") == 1


def test_step_buckets_span_a_millisecond_to_a_minute():
    m = WorkerMetrics("w0")
    m.observe_step(0.0005, 1.0, 1, 1)
    m.observe_step(59.0, 1.0, 1, 1)
    assert value(m, "chaos_step_duration_seconds_bucket", le="0.001") == 1
    assert value(m, "chaos_step_duration_seconds_bucket", le="30.0") == 1
    assert value(m, "chaos_step_duration_seconds_bucket", le="60.0") == 2


def test_links_export_own_fresh_figures_and_the_age_of_every_own_figure():
    m = busy_metrics()
    bandwidth = "chaos_link_bandwidth_bytes_per_second"
    assert value(m, bandwidth, src="w0", dst="w1") == pytest.approx(16 * MiB)
    assert value(m, "chaos_link_rtt_seconds", src="w0", dst="w1") == pytest.approx(0.002)
    assert value(m, "chaos_link_rtt_seconds", src="w0", dst="w2") is None, "stale: not a value"
    age = "chaos_link_measurement_age_seconds"
    assert value(m, age, src="w0", dst="w2", figure="rtt") == pytest.approx(40.0)
    assert value(m, "chaos_link_rtt_seconds", src="w1", dst="w2") is None, "another's link"


def test_update_links_replaces_the_previous_snapshot():
    m = busy_metrics()
    m.update_links(LinkTable(), now=0.0)
    assert value(m, "chaos_link_rtt_seconds", src="w0", dst="w1") is None
    assert value(m, "chaos_link_measurement_age_seconds", src="w0", dst="w1", figure="rtt") is None


def test_unknown_event_types_are_folded_into_other():
    m = WorkerMetrics("w0")
    m.observe_event("meteor", float("nan"))
    assert value(m, "chaos_membership_events_total", type="other") == 1
    assert value(m, "chaos_event_handling_seconds_count", type="other") is None


def test_replication_direction_is_checked():
    with pytest.raises(ValueError, match="direction"):
        WorkerMetrics("w0").add_replication_bytes("w1", "in", 5)


def test_each_instance_has_its_own_registry():
    a, b = WorkerMetrics("w0"), WorkerMetrics("w1")  # no duplicate-timeseries error
    a.observe_step(0.1, 1.0, 5, 2)
    assert value(b, "chaos_train_samples_total") == 0
    assert REGISTRY.get_sample_value("chaos_train_samples_total") is None


@pytest.mark.parametrize("make", [lambda: WorkerMetrics("w0"), busy_metrics])
def test_promtool_accepts_the_exposition(make):
    assert_promtool_accepts(make().render())


def test_serve_on_port_zero_returns_the_bound_port():
    m = busy_metrics()
    port = m.serve("127.0.0.1", 0)
    try:
        assert port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
            body = reply.read()
        assert b"chaos_train_samples_total 42.0" in body
        with pytest.raises(RuntimeError):
            m.serve("127.0.0.1", 0)
    finally:
        m.close()
