"""The Helm chart `helm/chaos`: lint, rendered objects, values schema (real `helm`, no cluster)."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from chaos_cli.main import build_parser

from tests.helmchart import CHART, PERMISSIONS, granted, helm, render
from tests.tools import REPO

pytestmark = pytest.mark.unit

FEDERATION = ["--set", "federation.enabled=true", "--set", "federation.identitySecret=chaos-id"]
MONITORS = [
    "--set",
    "metrics.serviceMonitor.enabled=true",
    "--set",
    "metrics.podMonitor.enabled=true",
]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("helm")


@pytest.fixture(scope="module")
def default(home: Path) -> list[dict[str, Any]]:
    return render(home=home)


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = of_kind(objects, kind)
    return found


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (c,) = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


@pytest.mark.parametrize("values", [None, *sorted((CHART / "ci").glob("*.yaml"))])
def test_helm_lint_strict(home: Path, values: Path | None):
    args = ["--values", str(values)] if values else []
    result = helm("lint", "--strict", str(CHART), *args, home=home)
    assert "0 chart(s) failed" in result.stdout


def test_default_objects(default):
    kinds = sorted(o["kind"] for o in default)
    assert kinds == sorted(
        ["ServiceAccount", "Deployment", "Service", "Role", "RoleBinding"]
        + ["ClusterRole", "ClusterRoleBinding"]  # kopf's read-only observer of CRDs, namespaces
        + ["CustomResourceDefinition"] * 2
        + ["ConfigMap"] * len(list((CHART / "dashboards").glob("*.json")))
    )
    for obj in default:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/part-of"] == "chaos", obj["kind"]
        assert labels["app.kubernetes.io/managed-by"] == "Helm", obj["kind"]
        assert labels["app.kubernetes.io/instance"] == "chaos", obj["kind"]
        assert labels["helm.sh/chart"] == "chaos-0.1.0", obj["kind"]


def test_operator_runs_standalone_once_with_args_the_cli_accepts(default):
    deployment = one(default, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    pod = deployment["spec"]["template"]
    assert set(deployment["spec"]["selector"]["matchLabels"].items()) <= set(
        pod["metadata"]["labels"].items()
    )
    assert pod["spec"]["serviceAccountName"] == one(default, "ServiceAccount")["metadata"]["name"]
    c = container(default)
    assert c["image"] == "chaos-train:0.1.0"
    args = build_parser().parse_args(c["args"])
    assert args.command == "operator"
    assert args.namespace == ["team-a"]
    assert args.metrics_port == 8081
    assert args.liveness == "http://0.0.0.0:8080/healthz"


def test_app_version_is_the_package_version():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    package = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert chart["appVersion"] == package  # the image tag the chart runs by default


def test_security_context_is_non_root_with_the_image_user(default):
    uid = int(re.search(r"useradd --uid (\d+)", (REPO / "Dockerfile").read_text()).group(1))
    pod = one(default, "Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] == uid
    c = container(default)["securityContext"]
    assert c["allowPrivilegeEscalation"] is False
    assert c["readOnlyRootFilesystem"] is True
    assert c["capabilities"]["drop"] == ["ALL"]
    assert {"name": "tmp", "mountPath": "/tmp"} in container(default)["volumeMounts"]
    assert container(default)["resources"]["limits"]["memory"]


def test_liveness_probe_is_kopfs_endpoint(default):
    c = container(default)
    probe = c["livenessProbe"]["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert probe["path"] == "/healthz"
    assert f"--liveness=http://0.0.0.0:{ports[probe['port']]}/healthz" in c["args"]


def test_metrics_service_reaches_the_metrics_port(default, home):
    service = one(default, "Service")
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "metrics"
    assert {"name": "metrics", "containerPort": 8081} in container(default)["ports"]
    assert (
        service["spec"]["selector"] == one(default, "Deployment")["spec"]["selector"]["matchLabels"]
    )
    off = render("--set", "metrics.enabled=false", home=home)
    assert not of_kind(off, "Service")
    assert "--metrics-port=0" in container(off)["args"]


def test_role_grants_exactly_what_the_operator_needs(default):
    role = one(default, "Role")
    assert role["metadata"]["namespace"] == "team-a"
    want = {(group, resource): set(verbs) for group, resource, verbs in PERMISSIONS}
    assert granted(role["rules"]) == want
    binding = one(default, "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    (subject,) = binding["subjects"]
    assert subject == {"kind": "ServiceAccount", "name": "chaos", "namespace": "team-a"}
    observer = one(default, "ClusterRole")
    assert all(set(r["verbs"]) <= {"list", "watch"} for r in observer["rules"])


def test_docs_list_the_same_permissions():
    docs = (REPO / "docs" / "operator.md").read_text()
    found = re.search(r"Permissions it needs in every watched namespace: (.*?)\(and", docs, re.S)
    line = found.group(1)
    listed = dict(re.findall(r"`([a-z/]+)`\s+([a-z/]+)", line))
    assert {r: set(v.split("/")) for r, v in listed.items()} == {
        r: set(v) for _, r, v in PERMISSIONS
    }


def test_watched_namespaces_get_a_role_each(home):
    objects = render("--set", "watchNamespaces={ml-a,ml-b}", home=home)
    assert sorted(r["metadata"]["namespace"] for r in of_kind(objects, "Role")) == ["ml-a", "ml-b"]
    assert sorted(r["metadata"]["namespace"] for r in of_kind(objects, "RoleBinding")) == [
        "ml-a",
        "ml-b",
    ]
    assert build_parser().parse_args(container(objects)["args"]).namespace == ["ml-a", "ml-b"]


def test_watch_all_uses_a_cluster_role(home):
    objects = render("--set", "watchAll=true", home=home)
    assert not of_kind(objects, "Role")
    roles = {r["metadata"]["name"]: r for r in of_kind(objects, "ClusterRole")}
    # cluster-scoped names carry the namespace: two parties' releases in one cluster coexist
    assert set(roles) == {"chaos-team-a", "chaos-team-a-observer"}
    want = {(group, resource): set(verbs) for group, resource, verbs in PERMISSIONS}
    assert granted(roles["chaos-team-a"]["rules"]) == want
    assert build_parser().parse_args(container(objects)["args"]).all_namespaces


def test_crds_are_the_generated_ones_and_kept(default, home):
    for path in sorted((REPO / "crds").glob("*.yaml")):
        copy = CHART / "files" / "crds" / path.name
        assert copy.read_text() == path.read_text(), f"cp {path} {copy}"
    assert len(list((CHART / "files" / "crds").glob("*.yaml"))) == len(
        list((REPO / "crds").glob("*.yaml"))
    )
    rendered = {c["metadata"]["name"]: c for c in of_kind(default, "CustomResourceDefinition")}
    for path in sorted((REPO / "crds").glob("*.yaml")):
        want = yaml.safe_load(path.read_text())
        got = rendered[want["metadata"]["name"]]
        annotations = got["metadata"].pop("annotations")
        assert annotations == {"helm.sh/resource-policy": "keep"}
        labels = got["metadata"].pop("labels")
        assert labels.items() >= want["metadata"].pop("labels").items()
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert got == want
    assert not of_kind(render("--set", "crds.install=false", home=home), "CustomResourceDefinition")


def test_dashboards_are_configmaps_for_the_grafana_sidecar(default, home):
    maps = {m["metadata"]["name"]: m for m in of_kind(default, "ConfigMap")}
    files = sorted((CHART / "dashboards").glob("*.json"))
    assert len(maps) == len(files) >= 2
    for path in files:
        cm = maps[f"chaos-{path.stem}"]
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm["metadata"]["annotations"] == {"grafana_folder": "Chaos"}
        assert json.loads(cm["data"][path.name]) == json.loads(path.read_text())
    moved = render(
        "--set", "dashboards.namespace=monitoring", "--set", "dashboards.label=dash", home=home
    )
    for cm in of_kind(moved, "ConfigMap"):
        assert cm["metadata"]["namespace"] == "monitoring"
        assert "dash" in cm["metadata"]["labels"]
    assert not of_kind(render("--set", "dashboards.enabled=false", home=home), "ConfigMap")


def test_monitors_only_where_the_monitoring_api_exists(home):
    without = render(*MONITORS, home=home)
    assert not of_kind(without, "ServiceMonitor")
    assert not of_kind(without, "PodMonitor")
    objects = render(*MONITORS, "--api-versions", "monitoring.coreos.com/v1", home=home)
    (endpoint,) = one(objects, "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["port"] == one(objects, "Service")["spec"]["ports"][0]["name"]
    pods = one(objects, "PodMonitor")["spec"]
    assert pods["namespaceSelector"] == {"matchNames": ["team-a"]}
    assert pods["selector"]["matchLabels"]["app.kubernetes.io/component"] == "worker"
    (endpoint,) = pods["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics"  # the trainer container's port name (reconcile.py)
    targets = {r["targetLabel"] for r in endpoint["relabelings"]}
    assert targets == {"chaos_job", "member"}  # what the dashboards select on
    default_off = render("--api-versions", "monitoring.coreos.com/v1", home=home)
    assert not of_kind(default_off, "ServiceMonitor")


def test_federation_listens_and_mounts_the_identity(home):
    objects = render(*FEDERATION, home=home)
    c = container(objects)
    assert "--federation-listen=0.0.0.0:8443" in c["args"]
    assert "--identity=/etc/chaos/identity" in c["args"]
    mount = next(m for m in c["volumeMounts"] if m["name"] == "identity")
    assert mount == {"name": "identity", "mountPath": "/etc/chaos/identity", "readOnly": True}
    volumes = one(objects, "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert next(v for v in volumes if v["name"] == "identity")["secret"]["secretName"] == "chaos-id"
    services = {s["metadata"]["name"]: s for s in of_kind(objects, "Service")}
    service = services["chaos-federation"]
    assert service["spec"]["ports"][0]["targetPort"] == "federation"
    assert {"name": "federation", "containerPort": 8443} in c["ports"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "federation.enabled=true"], "identitySecret"),
        (["--set", "image.pullPolicy=Sometimes"], "pullPolicy"),
        (["--set", "metrics.port=0"], "port"),
        (["--set", "metrics.port=http"], "port"),
        (["--set", "watchNamespaces={Team_A}"], "watchNamespaces"),
        (["--set", "operator.resyncSeconds=0"], "resyncSeconds"),
        (["--set", "metric.enabled=false"], "metric"),  # a typo is not silently ignored
        (["--set", "metrics.serviceMonitor.interval=often"], "interval"),
        (["--set", "resources.requests.cpu=lots"], "cpu"),
    ],
)
def test_schema_rejects_bad_values(home: Path, args: list[str], message: str):
    result = helm("template", "chaos", str(CHART), *args, home=home, check=False)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
    assert message in result.stderr
