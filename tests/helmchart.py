"""The Helm chart `helm/chaos` for the tests: rendering it and what its RBAC must grant."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.tools import REPO, helm_binary

CHART = REPO / "helm" / "chaos"
DASHBOARDS = sorted((CHART / "dashboards").glob("*.json"))

# (api group, resource, verbs) the operator needs in every watched namespace: docs/operator.md,
# "Permissions it needs". The chart must grant exactly these.
PERMISSIONS: list[tuple[str, str, frozenset[str]]] = [
    ("chaos.training.dev", "chaosjobs", frozenset({"get", "list", "watch", "patch", "delete"})),
    ("chaos.training.dev", "chaosjobs/status", frozenset({"patch"})),
    ("chaos.training.dev", "chaosjobs/scale", frozenset({"patch"})),
    ("chaos.training.dev", "chaosjobs/finalizers", frozenset({"update"})),
    ("chaos.training.dev", "chaospeers", frozenset({"get", "list", "watch"})),
    ("chaos.training.dev", "chaospeers/status", frozenset({"patch"})),
    ("", "pods", frozenset({"get", "list", "watch", "create", "patch", "delete"})),
    ("", "services", frozenset({"create"})),
    ("", "persistentvolumeclaims", frozenset({"create"})),
    ("", "secrets", frozenset({"get", "create", "update"})),
    ("", "events", frozenset({"create"})),
    ("", "resourcequotas", frozenset({"list"})),
]


def helm_env(home: Path) -> dict[str, str]:
    """Environment for helm with its cache, config and data under `home`, not the user's."""
    return {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }


def helm(*args: str, home: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run helm; a failure raises AssertionError with its output when `check`."""
    result = subprocess.run(
        [helm_binary(), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=helm_env(home),
    )
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
    return result


def render(*args: str, home: Path, namespace: str = "team-a") -> list[dict[str, Any]]:
    """`helm template chaos helm/chaos -n NAMESPACE ARGS...` as a list of objects."""
    out = helm("template", "chaos", str(CHART), "-n", namespace, *args, home=home).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def granted(rules: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    """(api group, resource) -> verbs of RBAC `rules`."""
    out: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        for group in rule.get("apiGroups", []):
            for resource in rule.get("resources", []):
                out.setdefault((group, resource), set()).update(rule.get("verbs", []))
    return out


def load(dashboard: Path) -> dict[str, Any]:
    return json.loads(dashboard.read_text())


def targets(board: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(panel, target) of every query of a dashboard, panels inside rows included."""
    out = []
    for panel in board["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            out += [(inner, t) for t in inner.get("targets", [])]
    return out


def substitute(expr: str, values: dict[str, str] | None = None, interval: str = "5m") -> str:
    """A query with Grafana's variables replaced, as Grafana does before sending it:
    `$__rate_interval`, `$__interval`, `$__range` by `interval`, others from `values`
    (default `x`)."""
    values = values or {}
    expr = re.sub(r"\$__(rate_interval|interval|range)\b", interval, expr)
    return re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), "x"), expr)
