"""The Grafana dashboards of the chart, without Grafana: structure, PromQL syntax (promtool)
and that every metric they query exists in the worker's or the operator's registry."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from chaos_operator.metrics import OperatorMetrics
from chaos_worker.telemetry.metrics import WorkerMetrics

from tests.helmchart import CHART, DASHBOARDS, load, substitute, targets
from tests.tools import promtool

pytestmark = pytest.mark.unit

DATASOURCE = "${datasource}"
# PromQL words that are not metric names.
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
KEYWORDS |= {"and", "or", "unless", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers outside label matchers, grouping
    clauses, ranges and strings that are neither functions nor keywords."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][\w:]*)(\s*\()?", expr):
        if not match.group(2) and match.group(1) not in KEYWORDS:
            names.add(match.group(1))
    return names


def exported() -> set[str]:
    """Every sample name the worker and the operator export (histogram series included)."""
    names = set()
    for metrics in (WorkerMetrics("w0"), OperatorMetrics()):
        for family in metrics.registry.collect():
            names.add(family.name)
            names.update(s.name for s in family.samples)
            if family.type == "histogram":
                names.update(f"{family.name}_{x}" for x in ("bucket", "sum", "count"))
            if family.type == "counter":
                names.add(f"{family.name}_total")
    return names


def test_there_are_a_job_and_an_operator_dashboard():
    assert {p.name for p in DASHBOARDS} == {"chaos-job.json", "chaos-operator.json"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_structure(path: Path):
    board = load(path)
    for key in ("uid", "title", "schemaVersion", "panels", "templating"):
        assert key in board, key
    assert board["editable"] is False
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"]["uid"] == DATASOURCE
    assert targets(board)
    for panel, target in targets(board):
        assert target["expr"].strip(), panel["title"]
        assert target["datasource"]["uid"] == DATASOURCE, panel["title"]
        assert panel["datasource"]["uid"] == DATASOURCE, panel["title"]
        used = set(re.findall(r"\$\{?(\w+)", target["expr"])) - {
            "__rate_interval",
            "__interval",
            "__range",
        }
        assert used <= set(variables), f"{panel['title']}: unknown variables {used}"
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]


def test_uids_are_unique_and_configmaps_stay_small():
    assert len({load(p)["uid"] for p in DASHBOARDS}) == len(DASHBOARDS)
    for path in DASHBOARDS:
        assert path.stat().st_size < 512 * 1024  # a ConfigMap holds at most 1 MiB


def test_job_dashboard_covers_what_the_issue_asks():
    names = set()
    for _, target in targets(load(CHART / "dashboards" / "chaos-job.json")):
        names |= metric_names(target["expr"])
    wanted = {
        "chaos_train_loss",
        "chaos_train_samples_total",
        "chaos_members",
        "chaos_step_duration_seconds_bucket",
        "chaos_membership_events_total",
        "chaos_event_handling_seconds_bucket",
        "chaos_scale_out_duration_seconds_count",
        "chaos_link_bandwidth_bytes_per_second",
        "chaos_link_rtt_seconds",
        "chaos_replication_bytes_total",
    }
    assert wanted <= names, wanted - names


def test_every_metric_queried_exists_in_a_registry():
    known = exported()
    for path in DASHBOARDS:
        board = load(path)
        queries = [t["expr"] for _, t in targets(board)]
        queries += [v["definition"] for v in board["templating"]["list"] if v["type"] == "query"]
        for expr in queries:
            names = metric_names(re.sub(r"label_values\((.*),\s*\w+\)$", r"\1", expr))
            assert names, f"{path.name}: no metric in {expr}"
            assert names <= known, f"{path.name}: {names - known} in {expr}"


def test_metric_name_parser():
    expr = 'sum by (le) (rate(chaos_x_bucket{a="b", c=~"$c"}[$__rate_interval])) / on(i) up'
    assert metric_names(substitute(expr)) == {"chaos_x_bucket", "up"}


def test_every_query_is_valid_promql(tmp_path: Path):
    rules = []
    for path in DASHBOARDS:
        for n, (panel, target) in enumerate(targets(load(path))):
            record = f"dashboard:{path.stem.replace('-', '_')}:{n}"
            rules.append({"record": record, "expr": substitute(target["expr"])})
            assert panel["title"]
    file = tmp_path / "rules.yaml"
    file.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = promtool("check", "rules", str(file))
    assert result.returncode == 0, (result.stdout + result.stderr).decode()
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout.decode()


def test_promtool_rejects_a_broken_query(tmp_path: Path):
    """The technique above can fail: a malformed expression is reported."""
    file = tmp_path / "rules.yaml"
    bad = {"record": "x:y", "expr": "sum by (le (rate(chaos_train_loss[5m]))"}
    file.write_text(yaml.safe_dump({"groups": [{"name": "g", "rules": [bad]}]}))
    assert promtool("check", "rules", str(file)).returncode != 0
