"""The Helm chart on a real API server: `helm install` (no --wait: nothing runs pods here)
creates the objects, the operator's service account may do what it needs and nothing more,
upgrade and uninstall behave as helm/README.md says, and `chaos operator` running with
nothing but the chart's RBAC reconciles a ChaosJob."""

from __future__ import annotations

import json
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.controlplane.plane import REPO, ControlPlane, Process, free_port, install_crds, poll
from tests.helmchart import CHART, PERMISSIONS, helm
from tests.tools import helm_binary

RELEASE = "chaos"
TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def helm_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    helm_binary()  # skip (or fail under CI) before starting an API server for nothing
    return tmp_path_factory.mktemp("helm")


def install(plane: ControlPlane, home: Path, namespace: str, *args: str) -> None:
    helm(
        "upgrade",
        "--install",
        RELEASE,
        str(CHART),
        "--namespace",
        namespace,
        "--create-namespace",
        "--kubeconfig",
        str(plane.kubeconfig),
        *args,
        home=home,
    )


def can(plane: ControlPlane, namespace: str, verb: str, resource: str, where: str | None) -> bool:
    """`kubectl auth can-i` as the operator's service account."""
    group_resource, _, sub = resource.partition("/")
    args = ["auth", "can-i", verb, group_resource]
    args += [f"--subresource={sub}"] if sub else []
    args += [f"--namespace={where}"] if where else []
    args += [f"--as=system:serviceaccount:{namespace}:{RELEASE}"]
    done = plane.kubectl(*args, check=False)
    answer = (done.stdout.split() or [""])[0]  # "no" may come with " - reason"
    assert answer in ("yes", "no"), done.stdout + done.stderr
    return answer == "yes"


def qualified(group: str, resource: str) -> str:
    """`chaosjobs/status` of group G as `kubectl auth can-i` names it: `chaosjobs.G/status`."""
    name, _, sub = resource.partition("/")
    full = f"{name}.{group}" if group else name
    return f"{full}/{sub}" if sub else full


def test_install_upgrade_uninstall_and_rbac(
    control_plane_factory: Callable[[str], ControlPlane], helm_home: Path
) -> None:
    plane = control_plane_factory("/helm-rbac")
    for ns in ("ml-a", "ml-b", "elsewhere"):
        plane.kubectl("create", "namespace", ns)
    install(plane, helm_home, "chaos-system", "--set", "watchNamespaces={ml-a,ml-b}")

    deployment = plane.get("deployment", RELEASE, "chaos-system")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == RELEASE
    plane.get("serviceaccount", RELEASE, "chaos-system")
    plane.get("service", f"{RELEASE}-metrics", "chaos-system")
    for name in ("chaos-job", "chaos-operator"):
        cm = plane.get("configmap", f"{RELEASE}-{name}", "chaos-system")
        assert json.loads(cm["data"][f"{name}.json"])["uid"] == name
    crds = [
        yaml.safe_load(p.read_text())["metadata"]["name"]
        for p in sorted(CHART.glob("files/crds/*.yaml"))
    ]
    plane.kubectl(
        "wait", "--for=condition=Established", "--timeout=120s", *(f"crd/{n}" for n in crds)
    )

    # Exactly the listed rights, in the watched namespaces only.
    for ns in ("ml-a", "ml-b"):
        plane.get("role", RELEASE, ns)
        for group, resource, verbs in PERMISSIONS:
            for verb in verbs:
                assert can(plane, "chaos-system", verb, qualified(group, resource), ns), (
                    verb,
                    resource,
                    ns,
                )
    for verb, resource, ns in [
        ("create", "pods", "elsewhere"),
        ("get", "chaosjobs.chaos.training.dev", "chaos-system"),
        ("delete", "chaospeers.chaos.training.dev", "ml-a"),  # chaosjobs: the TTL deletes
        ("update", "chaosjobs.chaos.training.dev", "ml-a"),
        ("list", "secrets", "ml-a"),  # only the Secrets it names: its CA, its pods'
        ("delete", "secrets", "ml-a"),
        ("delete", "services", "ml-a"),
        ("create", "pods", None),
    ]:
        assert not can(plane, "chaos-system", verb, resource, ns), (verb, resource, ns)
    assert can(
        plane, "chaos-system", "watch", "customresourcedefinitions.apiextensions.k8s.io", None
    )
    assert can(plane, "chaos-system", "list", "namespaces", None)

    # Upgrade to every namespace: a ClusterRole replaces the Roles.
    install(plane, helm_home, "chaos-system", "--reuse-values", "--set", "watchAll=true")
    assert can(plane, "chaos-system", "create", "pods", "elsewhere")
    assert can(plane, "chaos-system", "patch", "chaosjobs.chaos.training.dev/status", "elsewhere")
    assert not can(plane, "chaos-system", "list", "secrets", "elsewhere")
    roles = plane.kubectl("get", "roles", "-n", "ml-a", "-o", "name").stdout.split()
    assert f"role.rbac.authorization.k8s.io/{RELEASE}" not in roles
    args = deployment_args(plane, "chaos-system")
    assert "--all-namespaces" in args

    # A second party's release in the same cluster: its own cluster-scoped names, CRDs shared.
    install(plane, helm_home, "party-b", "--set", "crds.install=false")
    assert can(plane, "party-b", "create", "pods", "party-b")
    assert not can(plane, "party-b", "create", "pods", "ml-a")

    # Uninstall: the operator goes, the CRDs (and so every ChaosJob) stay.
    sample = yaml.safe_load((REPO / "examples" / "chaosjob.yaml").read_text())
    sample["metadata"]["namespace"] = "ml-a"
    plane.apply(sample)
    helm(
        "uninstall",
        RELEASE,
        "-n",
        "chaos-system",
        "--kubeconfig",
        str(plane.kubeconfig),
        home=helm_home,
    )
    gone = plane.kubectl("get", "deployment", RELEASE, "-n", "chaos-system", check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr
    for name in crds:
        plane.get("crd", name)
    assert plane.get("chaosjob", "digits", "ml-a")["spec"]["replicas"] == 3


def deployment_args(plane: ControlPlane, namespace: str) -> list[str]:
    deployment = plane.get("deployment", RELEASE, namespace)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container["args"]


def operator_metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        lines = r.read().decode().splitlines()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in lines
        if line and not line.startswith("#")
    }


def test_operator_works_with_only_the_charts_rights(
    control_plane_factory: Callable[[str], ControlPlane], helm_home: Path, tmp_path: Path
) -> None:
    plane = control_plane_factory("/helm-operator")
    install_crds(plane)
    plane.kubectl("create", "namespace", "ml-a")
    install(
        plane,
        helm_home,
        "chaos-system",
        "--set",
        "watchNamespaces={ml-a}",
        "--set",
        "crds.install=false",
    )

    # The service account's own credentials, as the operator's pod would have them.
    token = plane.kubectl("create", "token", RELEASE, "-n", "chaos-system").stdout.strip()
    kubeconfig = yaml.safe_load(plane.kubeconfig.read_text())
    kubeconfig["users"] = [{"name": "chaos-admin", "user": {"token": token}}]
    sa_config = tmp_path / "operator.kubeconfig"
    sa_config.write_text(yaml.safe_dump(kubeconfig))
    sa_config.chmod(0o600)
    # The same arguments the chart gives the operator, with test ports on loopback.
    chart_args = deployment_args(plane, "chaos-system")
    assert chart_args[:2] == ["operator", "--namespace=ml-a"]
    metrics = free_port()
    argv = ["env", f"KUBECONFIG={sa_config}", sys.executable, "-m", "chaos_cli.main"]
    argv += [*chart_args[:2], "--resync=2", "--liveness=off", "--metrics-host=127.0.0.1"]
    argv += [f"--metrics-port={metrics}"]
    operator = Process("operator", argv, tmp_path / "operator.log").start()
    try:
        sample = yaml.safe_load((REPO / "examples" / "chaosjob.yaml").read_text())
        sample["metadata"]["namespace"] = "ml-a"
        plane.apply(sample)

        def pods() -> set[str]:
            out = plane.kubectl("get", "pods", "-n", "ml-a", "-o", "name").stdout.split()
            return {name.removeprefix("pod/") for name in out}

        def check(condition: Callable[[], object], what: str) -> None:
            def alive_condition() -> object:
                assert operator.alive(), f"operator exited:\n{operator.log_tail()}"
                return condition()

            try:
                poll(alive_condition, what, TIMEOUT_S)
            except TimeoutError as exc:
                raise AssertionError(f"{exc}\n{operator.log_tail(40)}") from None

        # Nothing runs pods here: they stay Pending, which is enough to see every right used.
        check(lambda: pods() == {"digits-w0", "digits-w1", "digits-w2"}, "3 pods")
        # and their identities (worker TLS is the operator's default)
        check(
            lambda: (
                {f"secret/digits-w{n}-tls" for n in range(3)} | {"secret/chaos-worker-ca"}
                <= set(plane.kubectl("get", "secrets", "-n", "ml-a", "-o", "name").stdout.split())
            ),
            "identity Secrets",
        )
        plane.get("service", "digits-workers", "ml-a")
        check(
            lambda: (
                plane.get("chaosjob", "digits", "ml-a").get("status", {}).get("phase") == "Pending"
            ),
            "status",
        )
        events = plane.kubectl("get", "events", "-n", "ml-a", "-o", "json").stdout
        assert "MemberAdded" in {e["reason"] for e in json.loads(events)["items"]}

        plane.kubectl("scale", "chaosjob/digits", "--replicas=2", "-n", "ml-a")
        check(lambda: pods() == {"digits-w0", "digits-w1"}, "scale-down")

        seen = operator_metrics(metrics)
        assert seen["chaos_operator_pods_created_total"] == 3
        assert seen["chaos_operator_pods_deleted_total"] == 1
        assert seen['chaos_operator_reconcile_total{result="error"}'] == 0
        check(
            lambda: operator_metrics(metrics)['chaos_operator_jobs{phase="Pending"}'] == 1, "jobs"
        )

        plane.kubectl("delete", "chaosjob", "digits", "-n", "ml-a")
        check(
            lambda: (
                sum(
                    v
                    for k, v in operator_metrics(metrics).items()
                    if k.startswith("chaos_operator_jobs{")
                )
                == 0
            ),
            "job forgotten",
        )
        log = (tmp_path / "operator.log").read_text()
        assert "Forbidden" not in log and "Not enough permissions" not in log, log[-3000:]
    finally:
        operator.stop()
