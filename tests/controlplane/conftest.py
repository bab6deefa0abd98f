"""Fixtures of the control-plane tier: a real etcd + kube-apiserver for the whole session.

Without the binaries (`bash scripts/build-k8s.sh`, Debian `etcd-server`) these tests are skipped
with the reason, except under CI (`CI` set and not false/0), where that is a failure.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.controlplane.plane import (
    ControlPlane,
    ControlPlaneUnavailable,
    Etcd,
    find_binaries,
    install_crds,
    start_control_plane,
)
from tests.tools import missing

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test in this folder belongs to the `controlplane` tier."""
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.controlplane)


@pytest.fixture(scope="session")
def k8s_binaries() -> tuple[Path, Path]:
    """(Kubernetes bin dir, etcd); skips, or fails under CI, when they are missing."""
    try:
        return find_binaries()
    except ControlPlaneUnavailable as exc:
        missing(f"control-plane binaries missing: {exc}")


@pytest.fixture(scope="session")
def cp_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Session directory for data, keys, kubeconfigs and the servers' logs (kept by pytest)."""
    return tmp_path_factory.mktemp("controlplane")


@pytest.fixture(scope="session")
def etcd(k8s_binaries: tuple[Path, Path], cp_workdir: Path) -> Iterator[Etcd]:
    """One etcd for the session; API servers share it under different prefixes."""
    server = Etcd.start(k8s_binaries[1], cp_workdir)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def control_plane_factory(
    k8s_binaries: tuple[Path, Path], etcd: Etcd, cp_workdir: Path
) -> Iterator[Callable[[str], ControlPlane]]:
    """Start further API servers on the session's etcd: `factory(prefix)`, e.g. `/party-b`.

    Prefixes must not be prefixes of each other. Everything started stops at session end.
    """
    planes: list[ControlPlane] = []

    def start(prefix: str) -> ControlPlane:
        name = prefix.strip("/").replace("/", "-") or "root"
        plane = start_control_plane(k8s_binaries[0], etcd, cp_workdir / name, prefix)
        planes.append(plane)
        return plane

    yield start
    for plane in reversed(planes):
        plane.stop()


@pytest.fixture(scope="session")
def control_plane(control_plane_factory: Callable[[str], ControlPlane]) -> ControlPlane:
    """The session's main API server (etcd prefix `/party-a`): `.kubeconfig`, `.server`,
    `.kubectl(*args)`. No CRDs installed; use `crds` for that."""
    return control_plane_factory("/party-a")


@pytest.fixture(scope="session")
def crds(control_plane: ControlPlane) -> list[str]:
    """The generated CRDs applied once per session and Established; their names."""
    return install_crds(control_plane)


@pytest.fixture
def namespace(control_plane: ControlPlane) -> Iterator[str]:
    """A fresh namespace per test; deleted afterwards without waiting (an API server without
    kube-controller-manager never finishes deleting namespaces)."""
    name = f"t-{secrets.token_hex(4)}"
    control_plane.kubectl("create", "namespace", name)
    yield name
    control_plane.kubectl("delete", "namespace", name, "--wait=false", check=False)
